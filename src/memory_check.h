// Refusing memory whose traffic depends on the data it holds: CUDA compressible memory.
#pragma once

#include <cstdint>

#include "dhp/dhp.h"

namespace dhp {

// DHP_SUCCESS when no byte of [begin, end) lies in compressible memory (cuMemCreate with
// CU_MEM_ALLOCATION_COMP_GENERIC); DHP_ERROR_UNSUPPORTED, naming `name`, when some byte does; DHP_ERROR_CUDA
// when the driver cannot tell. It walks every virtual-memory mapping the range crosses. Calls the driver:
// use it only once a GPU is known to be present.
dhp_status check_not_compressible(const char* name, uintptr_t begin, uintptr_t end);

}  // namespace dhp
