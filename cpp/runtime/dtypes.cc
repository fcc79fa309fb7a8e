#include "runtime/dtypes.h"

#include "runtime/pjrt.h"

namespace metagrad {

const std::vector<DType>& DTypes() {
  static const std::vector<DType> table = {
      {PJRT_Buffer_Type_PRED, "bool", "i1", 1, 6, false},
      {PJRT_Buffer_Type_S8, "int8", "i8", 1, 0, false},
      {PJRT_Buffer_Type_S16, "int16", "i16", 2, 0, false},
      {PJRT_Buffer_Type_S32, "int32", "i32", 4, 0, false},
      {PJRT_Buffer_Type_S64, "int64", "i64", 8, 0, false},
      {PJRT_Buffer_Type_U8, "uint8", "ui8", 1, 1, false},
      {PJRT_Buffer_Type_U16, "uint16", "ui16", 2, 1, false},
      {PJRT_Buffer_Type_U32, "uint32", "ui32", 4, 1, false},
      {PJRT_Buffer_Type_U64, "uint64", "ui64", 8, 1, false},
      {PJRT_Buffer_Type_F16, "float16", "f16", 2, 2, true},
      {PJRT_Buffer_Type_BF16, "bfloat16", "bf16", 2, 4, true},
      {PJRT_Buffer_Type_F32, "float32", "f32", 4, 2, true},
      {PJRT_Buffer_Type_F64, "float64", "f64", 8, 2, true},
      {PJRT_Buffer_Type_C64, "complex64", "complex<f32>", 8, 5, false},
      {PJRT_Buffer_Type_C128, "complex128", "complex<f64>", 16, 5, false},
  };
  return table;
}

const DType& DTypeOf(PJRT_Buffer_Type type) {
  for (const DType& d : DTypes()) {
    if (d.type == type) return d;
  }
  throw InvalidArgument("unsupported element type (PJRT type " + std::to_string(static_cast<int>(type)) + ")");
}

const DType& DTypeNamed(const std::string& name) {
  for (const DType& d : DTypes()) {
    if (name == d.name) return d;
  }
  throw InvalidArgument("unsupported dtype '" + name + "'");
}

const DType& DTypeFromDLPack(uint8_t code, int bits) {
  for (const DType& d : DTypes()) {
    if (d.dlpack == code && static_cast<int>(d.size * 8) == bits) return d;
  }
  throw InvalidArgument("unsupported array dtype (DLPack code " + std::to_string(code) + ", " +
                        std::to_string(bits) + " bits)");
}

}  // namespace metagrad
