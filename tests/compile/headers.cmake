# Compiles every header under HEADERS (include/procpool, folders included) on
# its own: a translation unit holding only `#include <procpool/...>`, with
# COMPILER and FLAGS (which hold -Werror). A header that needs something
# included before it fails here. Then checks that the detail layer is closed:
# a header under detail/ includes only other detail headers and the
# vocabulary headers VOCABULARY (the exception types, the codec, exit_status).
#
# EXCEPTIONS names headers (relative to HEADERS) that are by design a part of
# another and are not compiled alone; the caller says why beside the list.
# WITH_MPI false skips mpi.hpp and the headers under mpi/ (they need mpi.h).
# OUTPUT_DIR receives the translation units, one a header.
cmake_policy(VERSION 3.25)
file(GLOB_RECURSE headers RELATIVE "${HEADERS}" "${HEADERS}/*.hpp")
list(SORT headers)
file(MAKE_DIRECTORY "${OUTPUT_DIR}")

set(failed "")
set(compiled 0)
foreach(header IN LISTS headers)
  if(header IN_LIST EXCEPTIONS)
    continue()
  endif()
  if(NOT WITH_MPI AND (header STREQUAL "mpi.hpp" OR header MATCHES "^mpi/"))
    continue()
  endif()
  string(MAKE_C_IDENTIFIER "${header}" id)
  set(unit "${OUTPUT_DIR}/${id}.cpp")
  file(WRITE "${unit}" "#include <procpool/${header}>\n")
  execute_process(COMMAND "${COMPILER}" ${FLAGS} -fsyntax-only "${unit}"
                  RESULT_VARIABLE rc OUTPUT_VARIABLE out ERROR_VARIABLE out)
  math(EXPR compiled "${compiled} + 1")
  if(NOT rc EQUAL 0)
    list(APPEND failed "${header}")
    message("procpool/${header} does not compile on its own:\n${out}")
  endif()
endforeach()

# The detail layer is closed: its #include "..." lines lead only to detail
# headers and the vocabulary headers.
set(leaks "")
foreach(header IN LISTS headers)
  if(NOT header MATCHES "^detail/")
    continue()
  endif()
  get_filename_component(dir "${HEADERS}/${header}" DIRECTORY)
  file(STRINGS "${HEADERS}/${header}" lines REGEX "^#include \"[^\"]+\"")
  foreach(line IN LISTS lines)
    string(REGEX REPLACE "^#include \"([^\"]+)\".*" "\\1" included "${line}")
    get_filename_component(target "${dir}/${included}" ABSOLUTE)
    file(RELATIVE_PATH target "${HEADERS}" "${target}")
    if(NOT target MATCHES "^detail/" AND NOT target IN_LIST VOCABULARY)
      list(APPEND leaks "procpool/${header} includes procpool/${target}")
    endif()
  endforeach()
endforeach()

list(LENGTH failed failures)
message(STATUS "${compiled} headers compiled alone, ${failures} failed")
set(report "")
if(failed)
  string(REPLACE ";" "\n  " failed "${failed}")
  string(APPEND report "headers that do not compile on their own:\n  ${failed}\n")
endif()
if(leaks)
  string(REPLACE ";" "\n  " leaks "${leaks}")
  string(APPEND report "detail headers that include a public header other than the vocabulary "
                       "headers (${VOCABULARY}):\n  ${leaks}\n")
endif()
if(report)
  message(FATAL_ERROR "${report}")
endif()
