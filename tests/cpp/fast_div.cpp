// FastDiv (src/kernels/fast_div.h), the forward's division of the tile index by launch-time constants: the
// multiply-high quotient (FastDiv::div, whose host path multiplies as __umulhi does on the device) equals n / d for every divisor class (1, powers
// of two, odd, near 2^31) over small n exhaustively and a stride up to 2^31 - 1. Needs no GPU.
#include <cstdint>
#include <cstdio>

#include "kernels/fast_div.h"

namespace {
uint32_t quotient(const dhp::kernels::FastDiv& f, uint32_t n) { return uint32_t(f.div(int(n))); }
}  // namespace

int main() {
  const uint32_t divisors[] = {1, 2, 3, 5, 7, 8, 11, 16, 17, 31, 32, 33, 86, 127, 128, 129, 1000, 4096, 65535, 65536,
                               (1u << 20) + 1, (1u << 30) + 3, 2147483647u};
  long failures = 0;
  for (uint32_t d : divisors) {
    const auto f = dhp::kernels::FastDiv::make(d);
    for (uint64_t n = 0; n <= 2147483647u; n += n < 70000 ? 1 : 104729) {
      if (quotient(f, uint32_t(n)) != n / d && failures++ < 5)
        std::printf("FastDiv(%u): %llu / %u gave %u\n", d, (unsigned long long)n, d, quotient(f, uint32_t(n)));
    }
    if (quotient(f, 2147483647u) != 2147483647u / d && failures++ < 5) std::printf("FastDiv(%u) at 2^31 - 1\n", d);
  }
  std::printf("fast_div: %ld failures\n", failures);
  return failures == 0 ? 0 : 1;
}
