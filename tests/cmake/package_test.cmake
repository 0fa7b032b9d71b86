# Makes procpool's packages with cpack and checks them as a user would:
# the .deb unpacked with dpkg-deb -x into a temporary root must hold the
# headers, the CMake package, procpool.pc, the license and the docs, and the
# find_package consumer (tests/cmake/consumer) must build and run against it;
# the .tar.gz must hold the same files. Run with cmake -P and:
#   SOURCE_DIR  procpool's source tree
#   WORK_DIR    an empty scratch directory of this test's own
#   CXX         the C++ compiler
#   CPACK       the cpack program
#   DOCS        ON to build the API reference into the packages (needs Doxygen)
#   MPI         ON to check find_package(procpool COMPONENTS mpi) too
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
set(build "${WORK_DIR}/build")

# A build of its own that holds nothing but what is packaged.
run("${CMAKE_COMMAND}" -S "${SOURCE_DIR}" -B "${build}" -G Ninja "-DCMAKE_CXX_COMPILER=${CXX}"
    -DPROCPOOL_BUILD_TESTS=OFF -DPROCPOOL_BUILD_EXAMPLES=OFF "-DPROCPOOL_BUILD_DOCS=${DOCS}")
run("${CMAKE_COMMAND}" --build "${build}")
# CPACK_GENERATOR (cmake/packaging.cmake) names both: DEB and TGZ.
run("${CPACK}" -B "${WORK_DIR}/packages" WORKING_DIRECTORY "${build}")
file(GLOB debs "${WORK_DIR}/packages/libprocpool-dev_*_all.deb")
file(GLOB tarballs "${WORK_DIR}/packages/procpool-*.tar.gz")
list(LENGTH debs n_debs)
list(LENGTH tarballs n_tarballs)
if(NOT n_debs EQUAL 1 OR NOT n_tarballs EQUAL 1)
  file(GLOB made "${WORK_DIR}/packages/*")
  message(FATAL_ERROR "expected one libprocpool-dev_*_all.deb and one procpool-*.tar.gz, cpack made: ${made}")
endif()

# The .deb's control fields.
run(dpkg-deb --field "${debs}" Package Architecture Depends)
foreach(expected "Package: libprocpool-dev" "Architecture: all" "libfmt-dev" "libboost1.81-dev")
  string(FIND "${last_output}" "${expected}" at)
  if(at EQUAL -1)
    message(FATAL_ERROR "the .deb's control lacks '${expected}':\n${last_output}")
  endif()
endforeach()

set(files
  include/procpool/procpool.hpp
  include/procpool/pool.hpp
  include/procpool/mpi.hpp
  include/procpool/mpi/pool.hpp
  include/procpool/detail/transport/ring.hpp
  share/cmake/procpool/procpoolConfig.cmake
  share/cmake/procpool/procpoolConfigVersion.cmake
  share/cmake/procpool/procpoolTargets.cmake
  share/pkgconfig/procpool.pc
  share/doc/procpool/LICENSE
  share/doc/procpool/README.md
  share/doc/procpool/docs/guide.md
  share/doc/procpool/docs/processes.md
  share/doc/procpool/docs/img/bench-tiny.png
  share/doc/procpool/examples/squares_cubes.cpp)
if(DOCS)
  list(APPEND files share/doc/procpool/html/index.html share/doc/procpool/html/classprocpool_1_1pool.html)
endif()

function(check_tree root what)
  foreach(f IN LISTS files)
    if(NOT EXISTS "${root}/${f}")
      file(GLOB_RECURSE have RELATIVE "${root}" "${root}/*")
      list(FILTER have EXCLUDE REGEX "/html/.")
      message(FATAL_ERROR "the ${what} lacks ${f}; it holds:\n${have}")
    endif()
  endforeach()
endfunction()

# The .deb, unpacked as dpkg would install it, under a temporary root.
set(root "${WORK_DIR}/root")
run(dpkg-deb -x "${debs}" "${root}")
check_tree("${root}/usr" ".deb")

# The tarball: the same tree under procpool-<version>/.
file(MAKE_DIRECTORY "${WORK_DIR}/tar")
run("${CMAKE_COMMAND}" -E tar xzf "${tarballs}" WORKING_DIRECTORY "${WORK_DIR}/tar")
file(GLOB tar_top "${WORK_DIR}/tar/procpool-*")
check_tree("${tar_top}" ".tar.gz")

# A user's project, against the unpacked .deb alone.
run("${CMAKE_COMMAND}" -S "${SOURCE_DIR}/tests/cmake/consumer" -B "${WORK_DIR}/consumer" -G Ninja
    "-DCMAKE_CXX_COMPILER=${CXX}" -DHOW=package "-DCHECK_MPI=${MPI}"
    "-DCMAKE_PREFIX_PATH=${root}/usr" -DCMAKE_FIND_PACKAGE_NO_PACKAGE_REGISTRY=ON
    -DCMAKE_FIND_USE_SYSTEM_PACKAGE_REGISTRY=OFF)
file(STRINGS "${WORK_DIR}/consumer/CMakeCache.txt" found_at REGEX "^procpool_DIR:")
if(NOT found_at MATCHES "^procpool_DIR:PATH=${root}/usr/share/cmake/procpool$")
  message(FATAL_ERROR "the consumer found procpool elsewhere than the unpacked .deb: ${found_at}")
endif()
run("${CMAKE_COMMAND}" --build "${WORK_DIR}/consumer")
run("${WORK_DIR}/consumer/consumer")
if(NOT last_output STREQUAL "consumer: ok\n")
  message(FATAL_ERROR "the consumer printed '${last_output}'")
endif()
