// The thread-local last-error sentence behind dhp_last_error(), shared by the API layer and the launchers.
#pragma once

#include "dhp/dhp.h"

namespace dhp {

// Records the printf-formatted sentence as the calling thread's last error and returns `status`.
dhp_status fail(dhp_status status, const char* fmt, ...) __attribute__((format(printf, 2, 3)));

// Clears the last error and returns DHP_SUCCESS.
dhp_status succeed();

}  // namespace dhp
