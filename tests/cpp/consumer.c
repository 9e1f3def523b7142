/* The smallest C user of dhp: calls the attention entry points from strict C99 (each refuses a NULL q before
 * touching a device), then prints the library's version and build. */
#include <stdio.h>

#include "dhp/dhp.h"

int main(void) {
  const dhp_attention_options options = DHP_ATTENTION_OPTIONS_DEFAULT;
  size_t bytes = 1;
  const int refused =
      dhp_attention_forward_check(NULL, NULL, NULL, NULL, NULL, &options) == DHP_ERROR_INVALID_VALUE &&
      dhp_attention_forward(NULL, NULL, NULL, NULL, NULL, &options, NULL) == DHP_ERROR_INVALID_VALUE &&
      dhp_attention_backward_workspace_size(NULL, NULL, &options, &bytes) == DHP_ERROR_INVALID_VALUE && bytes == 0 &&
      dhp_attention_backward_check(NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, &options, NULL, 0) ==
          DHP_ERROR_INVALID_VALUE &&
      dhp_attention_backward(NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, &options, NULL, 0, NULL) ==
          DHP_ERROR_INVALID_VALUE;
  if (!refused) {
    printf("FAIL: an attention entry point accepted a NULL q: %s\n", dhp_last_error());
    return 1;
  }
  printf("dhp %s\n%s\n", dhp_version(), dhp_build_info());
  return 0;
}
