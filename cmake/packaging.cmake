# cpack (run in a build directory) makes the two packages of procpool:
#   libprocpool-dev_<version>_all.deb   for Debian and derivatives, under /usr
#   procpool-<version>.tar.gz           the same tree, to unpack under any prefix
# Both hold what `cmake --install` installs: the headers, the CMake package
# (with its `mpi` component), procpool.pc, the license and the docs.
# tests/cmake/package_test.cmake builds a consumer against the .deb.
set(CPACK_PACKAGE_NAME procpool)
set(CPACK_PACKAGE_VENDOR procpool)
set(CPACK_PACKAGE_CONTACT "procpool developers")
set(CPACK_PACKAGE_VERSION "${PROJECT_VERSION}")
set(CPACK_PACKAGE_DESCRIPTION_SUMMARY "${PROJECT_DESCRIPTION}")
set(CPACK_PACKAGE_DESCRIPTION
  "procpool is a header-only C++17 library for Linux: a pool of worker processes that maps a function over inputs and returns the results in order, plus process, queue<T>, pipe<T>, robust locks and shared values. Workers are forked, so any callable works; a worker that throws, crashes or hangs becomes a typed exception and is replaced.")
set(CPACK_RESOURCE_FILE_LICENSE "${PROJECT_SOURCE_DIR}/LICENSE")
set(CPACK_RESOURCE_FILE_README "${PROJECT_SOURCE_DIR}/README.md")
set(CPACK_GENERATOR DEB TGZ)
set(CPACK_PACKAGE_FILE_NAME "procpool-${PROJECT_VERSION}")
set(CPACK_STRIP_FILES OFF)
# The .deb installs under /usr (its generator's default); the tarball unpacks
# as procpool-<version>/{include,share}.

set(CPACK_DEBIAN_PACKAGE_NAME libprocpool-dev)
set(CPACK_DEBIAN_FILE_NAME DEB-DEFAULT)
set(CPACK_DEBIAN_PACKAGE_ARCHITECTURE all)
set(CPACK_DEBIAN_PACKAGE_SECTION libdevel)
set(CPACK_DEBIAN_PACKAGE_DEPENDS "libboost1.81-dev | libboost-dev (>= 1.81), libfmt-dev")
set(CPACK_DEBIAN_PACKAGE_SUGGESTS "libopenmpi-dev, cmake (>= 3.25), pkg-config")

include(CPack)
