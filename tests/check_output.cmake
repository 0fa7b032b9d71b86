# Runs PROGRAM (with ARGS, started by LAUNCHER when given, e.g. mpirun and its
# arguments) and compares its standard output with the file EXPECTED.
#
# The first line of EXPECTED chooses the comparison:
#   "# exact"    the output equals the rest of the file, line for line;
#   "# any order" the output holds the same lines, each whole and each once, in any order.
# The program must exit 0 in both cases.
execute_process(COMMAND ${LAUNCHER} "${PROGRAM}" ${ARGS} OUTPUT_VARIABLE out RESULT_VARIABLE rc)
if(NOT rc EQUAL 0)
  message(FATAL_ERROR "${PROGRAM} exited with ${rc}; output:\n${out}")
endif()
file(READ "${EXPECTED}" expected)
string(REGEX MATCH "^# ([a-z ]+)\n" header "${expected}")
set(mode "${CMAKE_MATCH_1}")
string(LENGTH "${header}" header_length)
string(SUBSTRING "${expected}" ${header_length} -1 expected)

if(mode STREQUAL "any order")
  string(REPLACE "\n" ";" out_lines "${out}")
  string(REPLACE "\n" ";" expected_lines "${expected}")
  list(REMOVE_ITEM out_lines "")
  list(REMOVE_ITEM expected_lines "")
  list(SORT out_lines)
  list(SORT expected_lines)
  set(out "${out_lines}")
  set(expected "${expected_lines}")
elseif(NOT mode STREQUAL "exact")
  message(FATAL_ERROR "${EXPECTED}: first line must be '# exact' or '# any order'")
endif()
if(NOT out STREQUAL expected)
  message(FATAL_ERROR "output of ${PROGRAM} differs from ${EXPECTED}\n--- got:\n${out}\n--- expected:\n${expected}")
endif()
message(STATUS "output matches ${EXPECTED}")
