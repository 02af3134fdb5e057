/* The one translation unit of the test suite that holds the implementation. */
#define ACMOE_IMPLEMENTATION
#include "../acmoe.h"
