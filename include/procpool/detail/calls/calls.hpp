// Everything an engine needs of the calls it runs: the call interface and the
// driver it waits through (call_state.hpp), and the calls themselves
// (map_calls.hpp). The front end that makes calls is call_front.hpp.
#pragma once

#include "call_state.hpp"
#include "map_calls.hpp"
