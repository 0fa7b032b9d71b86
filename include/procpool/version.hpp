/// @file
/// The library's version: the one place it is written. CMake reads it from here.
#pragma once

/// Major version: changes when a public interface changes incompatibly.
#define PROCPOOL_VERSION_MAJOR 0
/// Minor version: changes when features are added compatibly.
#define PROCPOOL_VERSION_MINOR 1
/// Patch version: changes for fixes only.
#define PROCPOOL_VERSION_PATCH 0

/// The version as one number, `major * 10000 + minor * 100 + patch`.
#define PROCPOOL_VERSION \
  (PROCPOOL_VERSION_MAJOR * 10000 + PROCPOOL_VERSION_MINOR * 100 + PROCPOOL_VERSION_PATCH)
