/* The smallest C user of dhp: prints the library's version and build. */
#include <stdio.h>

#include "dhp/dhp.h"

int main(void) {
  printf("dhp %s\n%s\n", dhp_version(), dhp_build_info());
  return 0;
}
