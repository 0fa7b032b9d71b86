# Runs COMMAND (a ;-list: mpirun and its arguments) and expects the job to be
# ended by the MPI runtime because a rank died: a non-zero exit, and output that
# names the rank and signal 9. The ctest TIMEOUT bounds how long that may take.
execute_process(COMMAND ${COMMAND} OUTPUT_VARIABLE out ERROR_VARIABLE err RESULT_VARIABLE rc)
set(all "${out}${err}")
if(rc EQUAL 0)
  message(FATAL_ERROR "the job exited 0 although a rank died; output:\n${all}")
endif()
if(NOT all MATCHES "rank [0-9]+ [^\n]*exited on signal 9")
  message(FATAL_ERROR "the runtime did not name the rank and its signal; output:\n${all}")
endif()
if(all MATCHES "map returned")
  message(FATAL_ERROR "rank 0 returned from map although a rank died; output:\n${all}")
endif()
message(STATUS "the job was ended, as Open MPI does by default (exit ${rc})")
