/* C++ build test, part 2: a translation unit that only includes the header links against
   the implementation in part 1 and gets a correct product. */
#include <cstdio>

#include "../acmoe.h"

int main() {
    acmoe_ctx *ctx = NULL;
    float a[4] = {1, 2, 3, 4}, b[4] = {5, 6, 7, 8}, c[4];
    if (acmoe_ctx_create(&ctx, NULL) != ACMOE_OK) return 1;
    acmoe_status s = acmoe_matmul(ctx, ACMOE_NN, 2, 2, 2, a, 2, b, 2, c, 2, 0);
    acmoe_ctx_destroy(ctx);
    int ok = s == ACMOE_OK && c[0] == 19 && c[1] == 22 && c[2] == 43 && c[3] == 50;
    std::printf("C++ build: %s\n", ok ? "ok" : "wrong result");
    return ok ? 0 : 1;
}
