// Host side of TMA: encoding tensor maps over (batch, seqlen, heads, head_dim) tensors.
#pragma once

#include <cuda.h>

#include "params.h"

namespace dhp {

// Extents of a (batch, seqlen, heads, head_dim) tensor, listed innermost first as TMA wants them.
struct TensorMapShape {
  int head_dim;
  int seqlen;
  int heads;
  int batch;
};

// Encodes a 4-d tiled tensor map with 128-byte swizzle and boxes of 64 columns x `box_rows` rows of one
// head of one batch. Out-of-bounds rows read as zero and are not written. `name` goes into the error.
// With `pack` > 0 (dividing heads and box_rows) the map is 5-d, (head_dim, pack heads, heads / pack, seqlen, batch),
// and a box's rows are box_rows / pack positions of `pack` consecutive heads, the heads innermost: row r is position
// r / pack of head r % pack of the group.
dhp_status encode_tensor_map(CUtensorMap* map, DType dtype, const void* base, const TensorMapShape& shape,
                             const BshdStrides& strides, int box_rows, const char* name, int pack = 0);

}  // namespace dhp
