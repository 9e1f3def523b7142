// The calling thread's last-error sentence: a fixed buffer, so recording an error never allocates or throws.
#include "error.h"

#include <cstdarg>
#include <cstdio>

namespace dhp {
namespace {

thread_local char last_error[1024];

}  // namespace

dhp_status fail(dhp_status status, const char* fmt, ...) {
  va_list args;
  va_start(args, fmt);
  std::vsnprintf(last_error, sizeof(last_error), fmt, args);
  va_end(args);
  return status;
}

dhp_status succeed() {
  last_error[0] = '\0';
  return DHP_SUCCESS;
}

}  // namespace dhp

extern "C" const char* dhp_last_error(void) { return dhp::last_error; }
