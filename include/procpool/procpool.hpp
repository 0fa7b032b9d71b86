/// @file
/// Umbrella header: includes every public header of procpool.
#pragma once

#include "codec.hpp"
#include "errors.hpp"
#include "executor.hpp"
#include "exit_status.hpp"
#include "pipe.hpp"
#include "pool.hpp"
#include "process.hpp"
#include "progress.hpp"
#include "queue.hpp"
#include "shared.hpp"
#include "sync.hpp"
#include "version.hpp"
