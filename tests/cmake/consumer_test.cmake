# Builds and runs tests/cmake/consumer/main.cpp the way a user would consume
# procpool. Run with cmake -P and:
#   MODE        subdirectory | fetchcontent | package | copied-include | pkg-config
#   SOURCE_DIR  procpool's source tree
#   BINARY_DIR  procpool's build tree (for MODE package and pkg-config: installed from)
#   WORK_DIR    an empty scratch directory of this test's own
#   CXX         the C++ compiler
cmake_minimum_required(VERSION 3.25)

function(run)
  execute_process(COMMAND ${ARGN} RESULT_VARIABLE rc OUTPUT_VARIABLE out ERROR_VARIABLE err)
  if(NOT rc EQUAL 0)
    string(REPLACE ";" " " cmd "${ARGN}")
    message(FATAL_ERROR "failed (${rc}): ${cmd}\n${out}\n${err}")
  endif()
  set(last_output "${out}" PARENT_SCOPE)
endfunction()

file(REMOVE_RECURSE "${WORK_DIR}")
file(MAKE_DIRECTORY "${WORK_DIR}")
set(consumer "${SOURCE_DIR}/tests/cmake/consumer")
set(prefix "${WORK_DIR}/prefix")
set(program "${WORK_DIR}/consumer")

if(MODE STREQUAL "package" OR MODE STREQUAL "pkg-config")
  run("${CMAKE_COMMAND}" --install "${BINARY_DIR}" --prefix "${prefix}")
endif()

if(MODE STREQUAL "subdirectory" OR MODE STREQUAL "fetchcontent" OR MODE STREQUAL "package")
  set(how "${MODE}")
  run("${CMAKE_COMMAND}" -S "${consumer}" -B "${WORK_DIR}/build" -G Ninja
      "-DCMAKE_CXX_COMPILER=${CXX}" "-DHOW=${how}" "-DPROCPOOL_SOURCE_DIR=${SOURCE_DIR}"
      "-DCMAKE_PREFIX_PATH=${prefix}" -DCMAKE_FIND_PACKAGE_NO_PACKAGE_REGISTRY=ON)
  run("${CMAKE_COMMAND}" --build "${WORK_DIR}/build")
  set(program "${WORK_DIR}/build/consumer")
elseif(MODE STREQUAL "copied-include")
  # Only the include/ tree, copied elsewhere, and the dependencies.
  file(COPY "${SOURCE_DIR}/include" DESTINATION "${WORK_DIR}/vendored")
  run("${CXX}" -std=c++17 "-I${WORK_DIR}/vendored/include" "${consumer}/main.cpp" -o "${program}"
      -lfmt -pthread)
elseif(MODE STREQUAL "pkg-config")
  set(ENV{PKG_CONFIG_PATH} "${prefix}/share/pkgconfig")
  run(pkg-config --cflags procpool)
  string(STRIP "${last_output}" cflags)
  if(NOT cflags MATCHES "-I${prefix}/share/pkgconfig/../../include")
    message(FATAL_ERROR "pkg-config --cflags procpool gave '${cflags}', not the installed include dir")
  endif()
  run(pkg-config --libs procpool)
  string(STRIP "${last_output}" libs)
  separate_arguments(cflags UNIX_COMMAND "${cflags}")
  separate_arguments(libs UNIX_COMMAND "${libs}")
  run("${CXX}" -std=c++17 ${cflags} "${consumer}/main.cpp" -o "${program}" ${libs})
else()
  message(FATAL_ERROR "unknown MODE '${MODE}'")
endif()

run("${program}")
if(NOT last_output STREQUAL "consumer: ok\n")
  message(FATAL_ERROR "the consumer printed '${last_output}'")
endif()
