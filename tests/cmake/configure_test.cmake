# Configures procpool as a top-level project with Catch2 and MPI hidden, as on
# a machine with only Boost and {fmt}: it must succeed with the tests off and
# say so in one line; asking for the tests then must fail, naming Catch2.
# Run with cmake -P and SOURCE_DIR, WORK_DIR (scratch), CXX.
cmake_minimum_required(VERSION 3.25)

file(REMOVE_RECURSE "${WORK_DIR}")
set(hidden -DCMAKE_DISABLE_FIND_PACKAGE_Catch2=ON -DCMAKE_DISABLE_FIND_PACKAGE_MPI=ON)

execute_process(
  COMMAND "${CMAKE_COMMAND}" -S "${SOURCE_DIR}" -B "${WORK_DIR}/default" -G Ninja
          "-DCMAKE_CXX_COMPILER=${CXX}" ${hidden}
  RESULT_VARIABLE rc OUTPUT_VARIABLE out ERROR_VARIABLE err)
if(NOT rc EQUAL 0)
  message(FATAL_ERROR "configuring without Catch2 failed (${rc}):\n${out}\n${err}")
endif()
if(NOT out MATCHES "procpool: Catch2 v2 not found, so the tests are off")
  message(FATAL_ERROR "configuring without Catch2 did not say the tests are off:\n${out}")
endif()
file(STRINGS "${WORK_DIR}/default/CMakeCache.txt" tests_option REGEX "^PROCPOOL_BUILD_TESTS:")
if(NOT tests_option STREQUAL "PROCPOOL_BUILD_TESTS:BOOL=OFF")
  message(FATAL_ERROR "without Catch2 the cache says '${tests_option}'")
endif()

execute_process(
  COMMAND "${CMAKE_COMMAND}" -S "${SOURCE_DIR}" -B "${WORK_DIR}/asked" -G Ninja
          "-DCMAKE_CXX_COMPILER=${CXX}" ${hidden} -DPROCPOOL_BUILD_TESTS=ON
  RESULT_VARIABLE rc OUTPUT_VARIABLE out ERROR_VARIABLE err)
if(rc EQUAL 0)
  message(FATAL_ERROR "with -DPROCPOOL_BUILD_TESTS=ON and no Catch2, configuring succeeded")
endif()
if(NOT err MATCHES "Catch2")
  message(FATAL_ERROR "with -DPROCPOOL_BUILD_TESTS=ON and no Catch2, the error does not name Catch2:\n${err}")
endif()
