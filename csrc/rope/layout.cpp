#include "rope/layout.h"

#include <sstream>

namespace oneflow_rope {

namespace {

// name, ndim, seq_first, heads_before_seq, fused, slots, can_be_output
const LayoutDesc kLayouts[] = {
    {"BMHK", 4, false, false, false, 1, true},     {"BHMK", 4, false, true, false, 1, true},
    {"MBHK", 4, true, false, false, 1, true},      {"BM(HK)", 3, false, false, true, 1, true},
    {"MB(HK)", 3, true, false, true, 1, true},     {"BM(H2K)", 3, false, false, true, 2, false},
    {"MB(H2K)", 3, true, false, true, 2, false},   {"BM(H3K)", 3, false, false, true, 3, false},
    {"MB(H3K)", 3, true, false, true, 3, false},
};

std::string ShapeString(const std::vector<int64_t>& shape) {
  std::ostringstream os;
  os << "(";
  for (size_t i = 0; i < shape.size(); ++i) os << (i ? ", " : "") << shape[i];
  if (shape.size() == 1) os << ",";
  os << ")";
  return os.str();
}

}  // namespace

const LayoutDesc* FindLayout(const std::string& name) {
  for (const LayoutDesc& l : kLayouts) {
    if (name == l.name) return &l;
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

int BatchAxis(const LayoutDesc& l) { return l.seq_first ? 1 : 0; }
int SeqAxis(const LayoutDesc& l) { return l.seq_first ? 0 : (l.heads_before_seq ? 2 : 1); }
int HeadAxis(const LayoutDesc& l) { return l.fused ? 2 : (l.heads_before_seq ? 1 : 2); }

Mode ParseMode(const std::string& mode, bool* ok) {
  *ok = true;
  if (mode == "plane") return Mode::kPlane;
  if (mode == "interval") return Mode::kInterval;
  *ok = false;
  return Mode::kPlane;
}

int64_t SelectedSlot(const LayoutDesc& l, int64_t tensor_index) {
  if (l.slots == 2) return tensor_index - 1;  // 1 = key, 2 = value
  if (l.slots == 3) return tensor_index;      // 0 = query, 1 = key, 2 = value
  return 0;
}

std::string InferSizes(const std::vector<int64_t>& x_shape, const RopeCall& call,
                       RopeSizes* sizes) {
  std::ostringstream err;
  const LayoutDesc* l = FindLayout(call.x_layout);
  if (l == nullptr) {
    err << "layout: got '" << call.x_layout << "', expected one of " << LayoutNames(false);
    return err.str();
  }
  const LayoutDesc* o = FindLayout(call.output_layout);
  if (o == nullptr || !o->can_be_output) {
    err << "output_layout: got '" << call.output_layout << "', expected one of "
        << LayoutNames(true);
    return err.str();
  }
  bool mode_ok = false;
  ParseMode(call.mode, &mode_ok);
  if (!mode_ok) {
    err << "mode: got '" << call.mode << "', expected 'plane' or 'interval'";
    return err.str();
  }
  if (static_cast<int>(x_shape.size()) != l->ndim) {
    err << "x: layout " << l->name << " needs a " << l->ndim << "-D tensor, got shape "
        << ShapeString(x_shape);
    return err.str();
  }
  for (int64_t d : x_shape) {
    if (d < 0) {
      err << "x: negative size in shape " << ShapeString(x_shape);
      return err.str();
    }
  }
  if (l->slots == 2 && call.tensor_index != 1 && call.tensor_index != 2) {
    err << "tensor_index: got " << call.tensor_index << " for layout " << l->name
        << ", expected 1 (key) or 2 (value)";
    return err.str();
  }
  if (l->slots == 3 && (call.tensor_index < 0 || call.tensor_index > 2)) {
    err << "tensor_index: got " << call.tensor_index << " for layout " << l->name
        << ", expected 0 (query), 1 (key) or 2 (value)";
    return err.str();
  }
  if (l->slots == 1 && call.tensor_index != 0) {
    err << "tensor_index: got " << call.tensor_index << " for unpacked layout " << l->name
        << ", expected none (or 0)";
    return err.str();
  }
  RopeSizes s;
  s.B = x_shape[BatchAxis(*l)];
  s.M = x_shape[SeqAxis(*l)];
  if (!l->fused) {
    s.H = x_shape[HeadAxis(*l)];
    s.K = x_shape[3];
    if (call.k_size > 0 && call.k_size != s.K) {
      err << "k_size: got " << call.k_size << " but x of layout " << l->name << " and shape "
          << ShapeString(x_shape) << " has head size " << s.K;
      return err.str();
    }
  } else {
    if (call.k_size <= 0) {
      err << "k_size: layout " << l->name
          << " needs the head size; give k_size or a cos/sin table (got k_size=" << call.k_size
          << ")";
      return err.str();
    }
    s.K = call.k_size;
    const int64_t last = x_shape[2];
    if (last % (s.K * l->slots) != 0) {
      err << "k_size: last axis of x (" << last << ") is not a multiple of "
          << (l->slots > 1 ? std::to_string(l->slots) + " * " : std::string()) << "k_size ("
          << s.K << ") for layout " << l->name;
      return err.str();
    }
    s.H = last / (s.K * l->slots);
  }
  if (s.K <= 0 && s.B * s.M * s.H != 0) {
    err << "x: head size K must be positive, got " << s.K;
    return err.str();
  }
  const int64_t rotary_size = call.rotary_size > 0 ? call.rotary_size : s.K;
  if (call.rotary_size < 0 || rotary_size > s.K) {
    err << "rotary_size: got " << call.rotary_size << ", expected 1.." << s.K
        << " (at most the head size K)";
    return err.str();
  }
  if (call.rotary_dim != 1 && call.rotary_dim != 2) {
    err << "position_ids: rotary dim (axis 1) must be 1 or 2, got " << call.rotary_dim;
    return err.str();
  }
  if (s.K > 0 && (rotary_size % (2 * call.rotary_dim)) != 0) {
    err << "rotary_size: got " << rotary_size << "; with rotary dim " << call.rotary_dim
        << " each rotary part has rotary_size / " << call.rotary_dim
        << " dims, which must be even";
    return err.str();
  }
  *sizes = s;
  return "";
}

std::string CheckOptionalShapes(const RopeSizes& s, const RopeCall& call,
                                const std::vector<int64_t>& table_shape,
                                const std::vector<int64_t>& pos_shape) {
  std::ostringstream err;
  const int64_t rotary_size = call.rotary_size > 0 ? call.rotary_size : s.K;
  const int64_t part = rotary_size / call.rotary_dim;
  if (!pos_shape.empty()) {
    if (pos_shape.size() != 3 || pos_shape[0] != s.B || pos_shape[2] != s.M ||
        (pos_shape[1] != 1 && pos_shape[1] != 2)) {
      err << "position_ids: got shape " << ShapeString(pos_shape) << ", expected (" << s.B
          << ", 1, " << s.M << ") or (" << s.B << ", 2, " << s.M << ")";
      return err.str();
    }
    if (pos_shape[1] != call.rotary_dim) {
      err << "position_ids: axis 1 is " << pos_shape[1] << " but the op's rotary dim is "
          << call.rotary_dim;
      return err.str();
    }
  }
  if (!table_shape.empty()) {
    if (table_shape.size() != 2 || table_shape[1] != part) {
      err << "cos: got shape " << ShapeString(table_shape) << ", expected (P, " << part
          << ") (rotary_size " << rotary_size << " / rotary dim " << call.rotary_dim << ")";
      return err.str();
    }
    if (pos_shape.empty() && table_shape[0] < s.M) {
      err << "cos: table has " << table_shape[0] << " rows but x has sequence length " << s.M
          << "; without position_ids the table needs at least M rows";
      return err.str();
    }
  }
  return "";
}

std::vector<int64_t> LayoutShape(const LayoutDesc& l, const RopeSizes& s) {
  std::vector<int64_t> shape(l.ndim);
  shape[BatchAxis(l)] = s.B;
  shape[SeqAxis(l)] = s.M;
  if (l.fused) {
    shape[2] = s.H * l.slots * s.K;
  } else {
    shape[HeadAxis(l)] = s.H;
    shape[3] = s.K;
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
  st.b = stride[BatchAxis(l)];
  st.m = stride[SeqAxis(l)];
  if (l.fused) {
    st.h = l.slots * s.K;
    st.offset = slot * s.K;
  } else {
    st.h = stride[HeadAxis(l)];
  }
  st.k = 1;
  return st;
}

}  // namespace oneflow_rope
