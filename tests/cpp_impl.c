/* C++ build test, part 1: the implementation compiled as C++. */
#define ACMOE_IMPLEMENTATION
#include "../acmoe.h"
