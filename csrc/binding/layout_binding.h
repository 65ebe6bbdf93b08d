// Python functions over the layout code, defined the same way in both compiled modules (_C, with
// OneFlow, and _rope_raw, without): `infer_shapes`, the C++ side of the differential test against
// oneflow_rope.infer_shapes and the shape check of the raw driver, and `layout`, a table entry.
#ifndef ONEFLOW_ROPE_CSRC_BINDING_LAYOUT_BINDING_H_
#define ONEFLOW_ROPE_CSRC_BINDING_LAYOUT_BINDING_H_

#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <optional>
#include <string>
#include <vector>

#include "rope/layout.h"

namespace oneflow_rope {
namespace binding {

namespace py = pybind11;

inline py::dict LayoutDict(const LayoutDesc& l) {
  py::dict d;
  d["name"] = l.name;
  d["ndim"] = l.ndim;
  d["batch_axis"] = l.batch_axis;
  d["seq_axis"] = l.seq_axis;
  d["head_axis"] = l.head_axis;
  d["fused"] = l.fused;
  d["varlen"] = l.varlen;
  d["slots"] = l.slots;
  py::list indices, names;
  for (int s = 0; s < l.slots; ++s) {
    indices.append(l.tensor_index[s]);
    names.append(l.tensor_name[s] != nullptr ? py::object(py::str(l.tensor_name[s])) : py::object(py::none()));
  }
  d["tensor_indices"] = py::tuple(indices);
  d["tensor_names"] = py::tuple(names);
  d["default_tensor_index"] = l.default_tensor_index;
  d["unpacked"] = l.unpacked;
  d["can_be_output"] = l.can_be_output;
  return d;
}

// The rules of rope::InferShapes on a call's arguments as the user gives them. Returns a dict of
// what they resolve (the fields of oneflow_rope.RopeShapes, plus the selected slot), or raises
// ValueError with the rule's message.
inline py::dict InferShapesPy(const std::vector<int64_t>& x_shape, const std::string& layout,
                              const std::optional<std::string>& output_layout, const std::string& mode,
                              std::optional<int64_t> tensor_index, std::optional<int64_t> k_size,
                              std::optional<int64_t> rotary_size,
                              const std::optional<std::vector<int64_t>>& table_shape,
                              const std::optional<std::vector<int64_t>>& position_ids_shape,
                              const std::optional<std::vector<int64_t>>& k_shape, bool packed_qk,
                              std::optional<int64_t> seqlen_offset,
                              const std::optional<std::vector<int64_t>>& seqlen_offsets_shape,
                              const std::optional<std::vector<int64_t>>& inv_freq_shape,
                              const std::optional<std::vector<int64_t>>& cu_seqlens_shape) {
  RopeArgs args;
  args.x_shape = x_shape;
  args.layout = layout;
  args.output_layout = output_layout;
  args.mode = mode;
  args.tensor_index = tensor_index;
  args.k_size = k_size;
  args.rotary_size = rotary_size;
  args.table_shape = table_shape;
  args.position_ids_shape = position_ids_shape;
  args.k_shape = k_shape;
  args.packed_qk = packed_qk;
  args.seqlen_offset = seqlen_offset;
  args.seqlen_offsets_shape = seqlen_offsets_shape;
  args.inv_freq_shape = inv_freq_shape;
  args.cu_seqlens_shape = cu_seqlens_shape;
  RopeShapes s;
  const std::string err = InferShapes(args, &s);
  if (!err.empty()) throw py::value_error(err);
  py::dict d;
  d["batch"] = s.B;
  d["seq_len"] = s.M;
  d["num_heads"] = s.H;
  d["head_size"] = s.K;
  d["rotary_size"] = s.rotary_size;
  d["rotary_dim"] = s.rotary_dim;
  d["tensor_index"] = s.tensor_index;
  d["layout"] = s.layout->name;
  d["output_layout"] = s.output_layout->name;
  d["out_shape"] = py::tuple(py::cast(s.out_shape));
  d["slot"] = SelectedSlot(*s.layout, s.tensor_index);
  d["k_num_heads"] = s.k_num_heads ? py::object(py::int_(*s.k_num_heads)) : py::object(py::none());
  d["k_out_shape"] = s.k_out_shape ? py::object(py::tuple(py::cast(*s.k_out_shape))) : py::object(py::none());
  return d;
}

inline void DefineLayoutFunctions(py::module_& m) {
  m.def("infer_shapes", &InferShapesPy, py::arg("x_shape"), py::arg("layout") = ROPE_DEFAULT_LAYOUT,
        py::kw_only(), py::arg("output_layout") = py::none(), py::arg("mode") = "plane",
        py::arg("tensor_index") = py::none(), py::arg("k_size") = py::none(),
        py::arg("rotary_size") = py::none(), py::arg("table_shape") = py::none(),
        py::arg("position_ids_shape") = py::none(), py::arg("k_shape") = py::none(),
        py::arg("packed_qk") = false, py::arg("seqlen_offset") = py::none(),
        py::arg("seqlen_offsets_shape") = py::none(), py::arg("inv_freq_shape") = py::none(),
        py::arg("cu_seqlens_shape") = py::none(),
        "The C++ shape rules (rope::InferShapes, the op's inference) on a call's arguments: a dict of "
        "what they resolve, or ValueError naming the argument.");
  m.def(
      "layout",
      [](const std::string& name) {
        const LayoutDesc* l = FindLayout(name);
        if (l == nullptr) throw py::value_error("layout: got '" + name + "', expected one of " + LayoutNames(false));
        return LayoutDict(*l);
      },
      py::arg("name"), "The table entry of a layout (spaces and case ignored), as a dict.");
  m.def(
      "layouts",
      [] {
        py::list out;
        for (const LayoutDesc* l : AllLayouts()) out.append(LayoutDict(*l));
        return out;
      },
      "Every table entry, in the table's order.");
}

}  // namespace binding
}  // namespace oneflow_rope

#endif  // ONEFLOW_ROPE_CSRC_BINDING_LAYOUT_BINDING_H_
