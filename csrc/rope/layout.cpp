#include "rope/layout.h"

#include <algorithm>
#include <cctype>
#include <sstream>
#include <utility>

namespace oneflow_rope {

namespace {

#define ROPE_LAYOUT_ENTRY(name, ndim, batch, seq, head, fused, varlen, slots, i0, i1, i2, t0, t1, \
                          t2, default_index, unpacked, output)                                  \
  {name, ndim, batch, seq, head, fused, varlen, slots, {i0, i1, i2}, {t0, t1, t2}, default_index, \
   unpacked, output},
const LayoutDesc kLayouts[] = {ROPE_LAYOUTS(ROPE_LAYOUT_ENTRY)};
#undef ROPE_LAYOUT_ENTRY

std::string ShapeString(const std::vector<int64_t>& shape) {
  std::ostringstream os;
  os << "(";
  for (size_t i = 0; i < shape.size(); ++i) os << (i ? ", " : "") << shape[i];
  if (shape.size() == 1) os << ",";
  os << ")";
  return os.str();
}

bool HasNegative(const std::vector<int64_t>& shape) {
  return std::any_of(shape.begin(), shape.end(), [](int64_t d) { return d < 0; });
}

// Spaces removed, ASCII letters upper-cased (Python's layout.replace(" ", "").upper()).
std::string Normalized(const std::string& name) {
  std::string out;
  for (char c : name) {
    if (c == ' ') continue;
    out += static_cast<char>(std::toupper(static_cast<unsigned char>(c)));
  }
  return out;
}

// "expected one of ..." for layout arguments; same words as oneflow_rope.layout.parse_layout.
std::string LayoutError(const std::string& argument, const std::string& given, bool outputs_only) {
  const LayoutDesc* l = FindLayout(given);
  std::string extra = (l != nullptr && outputs_only && !l->can_be_output)
                          ? " (packed layouts are inputs only)" : "";
  return argument + ": got '" + given + "'" + extra + ", expected one of " + LayoutNames(outputs_only);
}

std::string ModeChoices() {
  const std::vector<std::string>& modes = ModeNames();
  std::string text;
  for (size_t i = 0; i < modes.size(); ++i) {
    if (i > 0) text += (i + 1 == modes.size()) ? " or " : ", ";
    text += "'" + modes[i] + "'";
  }
  return text;
}

// "1 (key) or 2 (value)"; same words as oneflow_rope.layout._index_choices.
std::string IndexChoices(const LayoutDesc& l) {
  if (l.slots == 1) return "None or 0 (only packed layouts hold several tensors)";
  std::string text;
  for (int s = 0; s < l.slots; ++s) {
    if (s > 0) text += (s + 1 == l.slots) ? " or " : ", ";
    text += std::to_string(l.tensor_index[s]) + " (" + l.tensor_name[s] + ")";
  }
  return text;
}

// The rule of a 1-D input (seqlen_offsets, inv_freq), as oneflow_rope.layout._vector_shape: "" or
// the message.
std::string VectorShapeError(const std::vector<int64_t>& shape, const std::string& argument,
                             const std::string& expected) {
  if (shape.size() != 1) return argument + ": got shape " + ShapeString(shape) + ", expected " + expected;
  if (shape[0] < 0) return argument + ": got shape " + ShapeString(shape) + ", which has a negative size";
  return "";
}

// Layouts holding one tensor ("BMHK, ..."), and packed ones holding a query and a key ("BM(H3K) or
// MB(H3K)"); same words as oneflow_rope.layout's _SINGLE_LAYOUTS and _QK_LAYOUTS.
bool HoldsQueryAndKey(const LayoutDesc& l) { return SlotNamed(l, "query") >= 0 && SlotNamed(l, "key") >= 0; }

std::string SingleLayouts() {
  std::string names;
  for (const LayoutDesc& l : kLayouts) {
    if (l.slots != 1) continue;
    if (!names.empty()) names += ", ";
    names += l.name;
  }
  return names;
}

// "(BM)HK, (BM)(HK), ..."; same words as oneflow_rope.layout._VARLEN_LAYOUTS.
std::string VarlenLayouts() {
  std::string names;
  for (const LayoutDesc& l : kLayouts) {
    if (!l.varlen) continue;
    if (!names.empty()) names += ", ";
    names += l.name;
  }
  return names;
}

// The output layouts that go with an input of this kind; as oneflow_rope.layout._output_choices.
std::string OutputChoices(bool varlen) {
  std::string names;
  for (const LayoutDesc& l : kLayouts) {
    if (!l.can_be_output || l.varlen != varlen) continue;
    if (!names.empty()) names += ", ";
    names += l.name;
  }
  return names;
}

// (B, M) of a tensor of this layout: (1, T) for a varlen layout's T tokens.
std::pair<int64_t, int64_t> BatchAndLength(const LayoutDesc& l, const std::vector<int64_t>& shape) {
  if (l.varlen) return {1, shape[l.seq_axis]};
  return {shape[l.batch_axis], shape[l.seq_axis]};
}

std::string QkLayouts() {
  std::string names;
  for (const LayoutDesc& l : kLayouts) {
    if (!HoldsQueryAndKey(l)) continue;
    if (!names.empty()) names += " or ";
    names += l.name;
  }
  return names;
}

// The tensor_index of the query (the table's tensor_indices["query"]).
int64_t QueryIndex() {
  for (const LayoutDesc& l : kLayouts) {
    const int64_t slot = SlotNamed(l, "query");
    if (slot >= 0) return l.tensor_index[slot];
  }
  return 0;
}

}  // namespace

const std::vector<const LayoutDesc*>& AllLayouts() {
  static const std::vector<const LayoutDesc*> all = [] {
    std::vector<const LayoutDesc*> v;
    for (const LayoutDesc& l : kLayouts) v.push_back(&l);
    return v;
  }();
  return all;
}

const LayoutDesc* FindLayout(const std::string& name) {
  for (const LayoutDesc& l : kLayouts) {
    if (name == l.name) return &l;
  }
  const std::string normalized = Normalized(name);
  for (const LayoutDesc& l : kLayouts) {
    if (normalized == l.name) return &l;
  }
  return nullptr;
}

std::string LayoutNames(bool outputs_only) {
  std::string names;
  for (const LayoutDesc& l : kLayouts) {
    if (outputs_only && !l.can_be_output) continue;
    if (!names.empty()) names += ", ";
    names += l.name;
  }
  return names;
}

int BatchAxis(const LayoutDesc& l) { return l.batch_axis; }
int SeqAxis(const LayoutDesc& l) { return l.seq_axis; }
int HeadAxis(const LayoutDesc& l) { return l.head_axis; }
int KAxis(const LayoutDesc& l) { return l.ndim - 1; }

const std::vector<std::string>& ModeNames() {
#define ROPE_MODE_NAME(name) name,
  static const std::vector<std::string> names = {ROPE_MODES(ROPE_MODE_NAME)};
#undef ROPE_MODE_NAME
  return names;
}

Mode ParseMode(const std::string& mode, bool* ok) {
  const std::vector<std::string>& names = ModeNames();
  for (size_t i = 0; i < names.size(); ++i) {
    if (mode == names[i]) {
      *ok = true;
      return static_cast<Mode>(i);  // the table lists the modes in the order of Mode
    }
  }
  *ok = false;
  return Mode::kPlane;
}

int64_t SelectedSlot(const LayoutDesc& l, int64_t tensor_index) {
  for (int s = 0; s < l.slots; ++s) {
    if (l.tensor_index[s] == tensor_index) return s;
  }
  return -1;
}

int64_t SlotNamed(const LayoutDesc& l, const char* name) {
  for (int s = 0; s < l.slots; ++s) {
    if (l.tensor_name[s] != nullptr && std::string(l.tensor_name[s]) == name) return s;
  }
  return -1;
}

// The rules, in the order of oneflow_rope.layout.infer_shapes; keep the two in step (the
// differential test compares every outcome and every message).
std::string InferShapes(const RopeArgs& args, RopeShapes* shapes) {
  std::ostringstream err;
  const LayoutDesc* info = FindLayout(args.layout);
  if (info == nullptr) return LayoutError("layout", args.layout, false);
  const std::string out_name = args.output_layout ? *args.output_layout : info->unpacked;
  const LayoutDesc* out_info = FindLayout(out_name);
  if (out_info == nullptr || !out_info->can_be_output) return LayoutError("output_layout", out_name, true);
  if (out_info->varlen != info->varlen) {
    err << "output_layout: got '" << out_info->name << "' for layout " << info->name << ", expected one of "
        << OutputChoices(info->varlen) << " (packed varlen tokens and batched sequences do not mix)";
    return err.str();
  }
  bool mode_ok = false;
  ParseMode(args.mode, &mode_ok);
  if (!mode_ok) return "mode: got '" + args.mode + "', expected " + ModeChoices();

  const std::vector<int64_t>& shape = args.x_shape;
  if (static_cast<int>(shape.size()) != info->ndim) {
    err << "x: layout " << info->name << " needs a " << info->ndim << "-D tensor, got shape "
        << ShapeString(shape) << " (" << shape.size() << "-D)";
    return err.str();
  }
  if (HasNegative(shape)) return "x: got shape " + ShapeString(shape) + ", which has a negative size";

  const int64_t index = args.tensor_index ? *args.tensor_index : info->default_tensor_index;
  if (SelectedSlot(*info, index) < 0) {
    err << "tensor_index: got " << index << " for layout " << info->name << ", expected "
        << IndexChoices(*info);
    return err.str();
  }

  if (args.packed_qk) {
    if (args.k_shape) {
      return "k: got shape " + ShapeString(*args.k_shape)
             + ", but q is a packed query-key-value tensor whose key is rotated with its query; give k=None";
    }
    if (!HoldsQueryAndKey(*info)) {
      err << "k: got None with layout " << info->name << "; without k, q must be a packed query-key-value tensor ("
          << QkLayouts() << ") whose query and key are rotated";
      return err.str();
    }
    if (index != QueryIndex()) {
      err << "tensor_index: got " << index << ", but a packed q+k call rotates the query and the key; expected "
          << QueryIndex() << " (query)";
      return err.str();
    }
  }
  std::vector<int64_t> k;
  if (args.k_shape) {
    k = *args.k_shape;
    if (info->slots > 1) {
      err << "k: layout " << info->name << " is packed; q and k must each be one tensor (" << SingleLayouts()
          << "), or give the packed query-key-value tensor as q with k=None";
      return err.str();
    }
    if (static_cast<int>(k.size()) != info->ndim) {
      err << "k: layout " << info->name << " needs a " << info->ndim << "-D tensor, got shape " << ShapeString(k)
          << " (" << k.size() << "-D)";
      return err.str();
    }
    if (HasNegative(k)) return "k: got shape " + ShapeString(k) + ", which has a negative size";
  }

  int32_t rotary_dim = 1;
  std::vector<int64_t> pos;
  if (args.position_ids_shape) {
    pos = *args.position_ids_shape;
    if (info->varlen) {
      if (pos.size() != 2 || (pos[0] != 1 && pos[0] != 2)) {
        return "position_ids: got shape " + ShapeString(pos) + ", expected (1, T) or (2, T) for the varlen layout "
               + info->name;
      }
    } else if (pos.size() != 3 || (pos[1] != 1 && pos[1] != 2)) {
      return "position_ids: got shape " + ShapeString(pos) + ", expected (B, 1, M) or (B, 2, M)";
    }
    if (HasNegative(pos)) return "position_ids: got shape " + ShapeString(pos) + ", which has a negative size";
    rotary_dim = static_cast<int32_t>(info->varlen ? pos[0] : pos[1]);
  }
  std::vector<int64_t> table;
  if (args.table_shape) {
    table = *args.table_shape;
    if (table.size() != 2) {
      return "cos: got shape " + ShapeString(table) + ", expected a 2-D table (P, rotary_size / rotary_dim)";
    }
    if (HasNegative(table)) return "cos: got shape " + ShapeString(table) + ", which has a negative size";
  }
  if (args.cu_seqlens_shape) {
    const std::vector<int64_t>& cu = *args.cu_seqlens_shape;
    if (!info->varlen) {
      err << "cu_seqlens: given with layout " << info->name
          << "; cu_seqlens gives the sequences of packed tokens, for the varlen layouts (" << VarlenLayouts() << ")";
      return err.str();
    }
    if (args.position_ids_shape) {
      return "cu_seqlens: given together with position_ids; a token's position comes from one of them, give one";
    }
    if (cu.size() != 1 || cu[0] < 1) {
      return "cu_seqlens: got shape " + ShapeString(cu)
             + ", expected (S+1,): the first token of each of the S sequences, then the number of tokens T";
    }
  } else if (info->varlen && !args.position_ids_shape) {
    err << "cu_seqlens: got None with the varlen layout " << info->name
        << ", whose tokens belong to packed sequences; give cu_seqlens (S+1,) or position_ids (R, T)";
    return err.str();
  }
  std::vector<int64_t> offsets;
  if (args.seqlen_offset || args.seqlen_offsets_shape) {
    if (args.seqlen_offset && args.seqlen_offsets_shape) {
      return "seqlen_offsets: got an int offset (" + std::to_string(*args.seqlen_offset)
             + ") and a tensor of offsets; give one of them";
    }
    if (args.position_ids_shape) {
      return "seqlen_offsets: given together with position_ids; token m of sequence b is at seqlen_offsets[b] + m "
             "only without position_ids, give one of them";
    }
    if (info->varlen) {
      err << "seqlen_offsets: given with the varlen layout " << info->name
          << ", whose token t of sequence s is at t - cu_seqlens[s]; give the positions as position_ids instead";
      return err.str();
    }
    if (args.seqlen_offsets_shape) {
      offsets = *args.seqlen_offsets_shape;
      const std::string bad = VectorShapeError(offsets, "seqlen_offsets", "(B,): one offset per sequence");
      if (!bad.empty()) return bad;
    }
  }
  std::vector<int64_t> inv;
  if (args.inv_freq_shape) {
    if (args.table_shape) {
      return "inv_freq: given together with cos/sin tables; inv_freq gives the frequencies of computed angles "
             "(instead of base), give it or the tables";
    }
    inv = *args.inv_freq_shape;
    const std::string bad = VectorShapeError(inv, "inv_freq", "a 1-D tensor (rotary_size / rotary_dim / 2,)");
    if (!bad.empty()) return bad;
  }
  if (args.k_size && *args.k_size <= 0) {
    return "k_size: got " + std::to_string(*args.k_size) + ", expected a positive head size";
  }
  if (args.rotary_size && *args.rotary_size <= 0) {
    return "rotary_size: got " + std::to_string(*args.rotary_size) + ", expected a positive number of dims";
  }

  const auto [B, M] = BatchAndLength(*info, shape);
  int64_t H = 0, K = 0;
  enum class Source { kX, kKSize, kTable } source = Source::kX;
  if (!info->fused) {
    H = shape[info->head_axis];
    K = shape[KAxis(*info)];
    if (args.k_size && *args.k_size != K) {
      err << "k_size: got " << *args.k_size << " but x of layout " << info->name << " and shape "
          << ShapeString(shape) << " has head size " << K;
      return err.str();
    }
    if (K == 0) return "x: got shape " + ShapeString(shape) + ", whose head size is 0; expected a positive head size";
  } else {
    if (args.k_size) {
      K = *args.k_size;
      source = Source::kKSize;
    } else if (args.table_shape && !args.rotary_size) {
      K = table[1] * rotary_dim;
      source = Source::kTable;
      if (K == 0) return "cos: got shape " + ShapeString(table) + ", whose width 0 gives no head size K";
    } else {
      const char* why = args.table_shape
                            ? "rotary_size is given, so the cos/sin width does not fix it"
                            : "give k_size or a cos/sin table";
      err << "k_size: layout " << info->name << " needs the head size K (" << why << "); got k_size=None";
      return err.str();
    }
    const int64_t step = K * info->slots;
    const int64_t last = shape.back();
    if (last % step != 0) {
      if (source == Source::kKSize) {
        err << "k_size: got " << K;
      } else {
        err << "cos: got shape " << ShapeString(table) << ", whose width gives K = " << K;
      }
      err << ", but the last axis of x (" << last << ") is not a multiple of ";
      if (info->slots > 1) {
        err << info->slots << " * K = " << step;
      } else {
        err << "K = " << K;
      }
      err << " for layout " << info->name;
      return err.str();
    }
    H = last / step;
  }

  std::optional<int64_t> k_heads;
  if (args.packed_qk) k_heads = H;
  if (args.k_shape) {
    if (BatchAndLength(*info, k) != std::make_pair(B, M)) {
      err << "k: got shape " << ShapeString(k);
      if (info->varlen) {
        err << "; q and k need the same tokens, q has T=" << M;
      } else {
        err << "; q and k need the same B and M, q has B=" << B << ", M=" << M;
      }
      return err.str();
    }
    if (!info->fused) {
      if (k.back() != K) {
        err << "k: got shape " << ShapeString(k) << ", whose head size " << k.back()
            << " differs from q's head size K=" << K;
        return err.str();
      }
      k_heads = k[info->head_axis];
    } else {
      if (k.back() % K != 0) {
        err << "k: got shape " << ShapeString(k) << ", whose last axis (" << k.back()
            << ") is not a multiple of the head size K = " << K << " for layout " << info->name;
        return err.str();
      }
      k_heads = k.back() / K;
    }
  }

  int64_t rotary = 0;
  if (!args.rotary_size) {
    rotary = K;
    if (rotary % (2 * rotary_dim) != 0) {
      if (source == Source::kTable) {
        err << "cos: got shape " << ShapeString(table) << "; its width " << table[1]
            << " is the number of dims of each rotary part, which must be even";
        return err.str();
      }
      if (source == Source::kX) {
        err << "x: got shape " << ShapeString(shape) << ", whose head size " << K;
      } else {
        err << "k_size: got " << K << "; the head size";
      }
      err << " is rotated whole when rotary_size is not given, and with rotary dim " << rotary_dim
          << " it must be a multiple of " << 2 * rotary_dim
          << " (each rotary part has an even number of dims); give rotary_size to rotate fewer dims";
      return err.str();
    }
  } else {
    rotary = *args.rotary_size;
    if (rotary > K) {
      err << "rotary_size: got " << rotary << ", expected at most the head size K=" << K;
      return err.str();
    }
    if (rotary % (2 * rotary_dim) != 0) {
      err << "rotary_size: got " << rotary << "; with rotary dim " << rotary_dim
          << " each rotary part has rotary_size / " << rotary_dim << " dims, which must be even";
      return err.str();
    }
  }
  const int64_t part = rotary / rotary_dim;

  if (args.position_ids_shape) {
    if (info->varlen && pos[1] != M) {
      err << "position_ids: got shape " << ShapeString(pos) << ", expected (" << rotary_dim << ", " << M
          << ") for x with T=" << M << " tokens";
      return err.str();
    }
    if (!info->varlen && (pos[0] != B || pos[2] != M)) {
      err << "position_ids: got shape " << ShapeString(pos) << ", expected (" << B << ", " << rotary_dim
          << ", " << M << ") for x with B=" << B << ", M=" << M;
      return err.str();
    }
  }
  if (args.table_shape) {
    if (table[1] != part) {
      err << "cos: got shape " << ShapeString(table) << ", expected (P, " << part
          << "): width rotary_size / rotary dim = " << rotary << " / " << rotary_dim;
      return err.str();
    }
    if (!args.position_ids_shape && !args.seqlen_offsets_shape && !args.cu_seqlens_shape) {
      // the positions are known: 0..M-1, or seqlen_offset + (0..M-1)
      const int64_t offset = args.seqlen_offset ? *args.seqlen_offset : 0;
      if (offset == 0 && table[0] < M) {
        err << "cos: got shape " << ShapeString(table) << ": " << table[0]
            << " rows, but x has sequence length M=" << M
            << "; without position_ids the table needs at least M rows";
        return err.str();
      }
      if (offset != 0 && M > 0 && (offset < 0 || offset > table[0] - M)) {
        err << "seqlen_offsets: got " << offset << ": the M=" << M << " tokens of each sequence are at positions "
            << offset << " to " << offset + M - 1 << ", outside the cos/sin table's rows 0 to " << table[0] - 1;
        return err.str();
      }
    }
  }
  if (args.seqlen_offsets_shape && offsets[0] != B) {
    err << "seqlen_offsets: got shape " << ShapeString(offsets) << ", expected (" << B << ",) for x with B=" << B;
    return err.str();
  }
  if (args.inv_freq_shape && inv[0] != part / 2) {
    err << "inv_freq: got shape " << ShapeString(inv) << ", expected (" << part / 2
        << ",): one frequency per pair of the " << part << " dims of a rotary part (rotary_size / rotary dim = "
        << rotary << " / " << rotary_dim << ")";
    return err.str();
  }

  RopeShapes s;
  s.B = B;
  s.M = M;
  s.H = H;
  s.K = K;
  s.rotary_size = rotary;
  s.rotary_dim = rotary_dim;
  s.tensor_index = index;
  s.layout = info;
  s.output_layout = out_info;
  RopeSizes sizes;
  sizes.B = B;
  sizes.M = M;
  sizes.H = H;
  sizes.K = K;
  s.out_shape = LayoutShape(*out_info, sizes);
  if (k_heads) {
    s.k_num_heads = k_heads;
    sizes.H = *k_heads;
    s.k_out_shape = LayoutShape(*out_info, sizes);
  }
  *shapes = std::move(s);
  return "";
}

std::string InferSizes(const std::vector<int64_t>& x_shape, const RopeCall& call, RopeSizes* sizes) {
  RopeArgs args;
  args.x_shape = x_shape;
  args.layout = call.x_layout;
  args.output_layout = call.output_layout;
  args.mode = call.mode;
  args.tensor_index = call.tensor_index;
  if (call.k_size > 0) args.k_size = call.k_size;
  if (call.rotary_size > 0) args.rotary_size = call.rotary_size;
  // the sequences of a varlen layout (cu_seqlens or position_ids) do not change its sizes
  const LayoutDesc* layout = FindLayout(call.x_layout);
  if (layout != nullptr && layout->varlen) args.cu_seqlens_shape = std::vector<int64_t>{1};
  RopeShapes shapes;
  const std::string err = InferShapes(args, &shapes);
  if (err.empty()) {
    sizes->B = shapes.B;
    sizes->M = shapes.M;
    sizes->H = shapes.H;
    sizes->K = shapes.K;
  }
  return err;
}

std::vector<int64_t> LayoutShape(const LayoutDesc& l, const RopeSizes& s) {
  std::vector<int64_t> shape(l.ndim);
  if (l.varlen) {
    shape[l.seq_axis] = s.B * s.M;
  } else {
    shape[l.batch_axis] = s.B;
    shape[l.seq_axis] = s.M;
  }
  if (l.fused) {
    shape[l.head_axis] = s.H * l.slots * s.K;
  } else {
    shape[l.head_axis] = s.H;
    shape[KAxis(l)] = s.K;
  }
  return shape;
}

LayoutStrides ContiguousStrides(const LayoutDesc& l, const RopeSizes& s, int64_t slot) {
  const std::vector<int64_t> shape = LayoutShape(l, s);
  std::vector<int64_t> stride(l.ndim);
  int64_t acc = 1;
  for (int i = l.ndim - 1; i >= 0; --i) {
    stride[i] = acc;
    acc *= shape[i];
  }
  LayoutStrides st;
  st.m = stride[l.seq_axis];
  st.b = l.varlen ? s.M * st.m : stride[l.batch_axis];  // varlen: the token axis holds (b, m), m fastest
  if (l.fused) {
    st.h = l.slots * s.K;
    st.offset = slot * s.K;
  } else {
    st.h = stride[l.head_axis];
  }
  st.k = 1;
  return st;
}

}  // namespace oneflow_rope
