/// @file
/// Umbrella header: includes every public header of procpool.
#pragma once

#include "errors.hpp"
#include "exit_status.hpp"
#include "version.hpp"
