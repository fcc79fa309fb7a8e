// The one table of element types: PJRT's enum, numpy's name, MLIR's name,
// the size, and DLPack's type code. Every conversion reads it.
#pragma once

#include <cstddef>
#include <cstdint>
#include <string>
#include <vector>

#include "pjrt_c_api.h"

namespace metagrad {

struct DType {
  PJRT_Buffer_Type type;
  const char* name;  // numpy / ml_dtypes name: "float32", "bfloat16", "bool"...
  const char* mlir;  // MLIR element type: "f32", "bf16", "i1"...
  size_t size;       // bytes per element
  uint8_t dlpack;    // DLPack DLDataTypeCode: 0 int, 1 uint, 2 float, 4 bfloat, 5 complex, 6 bool
  bool floating;     // real floating point: carries a cotangent
};

const std::vector<DType>& DTypes();
// Each throws InvalidArgument for a type outside the table.
const DType& DTypeOf(PJRT_Buffer_Type type);
const DType& DTypeNamed(const std::string& name);
const DType& DTypeFromDLPack(uint8_t code, int bits);

}  // namespace metagrad
