// The one Catch2 main shared by every test program.
//
// Catch's handlers for fatal signals are off: the tests fork children that are
// killed by SIGTERM, SIGSEGV or SIGABRT on purpose, and a child that inherited
// the handlers would report itself as a failed test run. A test program that
// crashes is still reported by ctest, with the signal.
#define CATCH_CONFIG_MAIN
#define CATCH_CONFIG_NO_POSIX_SIGNALS
#include <catch2/catch.hpp>
