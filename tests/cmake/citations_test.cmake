# The docs and the headers cite only what a reader of the repository has: no
# design document outside it (DESIGN.md) and no numbered section of one
# ("DESIGN §6"). Run with cmake -P and SOURCE_DIR.
cmake_minimum_required(VERSION 3.25)

file(GLOB_RECURSE sources "${SOURCE_DIR}/include/*.hpp")
file(GLOB pages "${SOURCE_DIR}/docs/*.md")
list(APPEND sources ${pages} "${SOURCE_DIR}/README.md")
set(problems "")
foreach(source IN LISTS sources)
  file(STRINGS "${source}" lines)
  file(RELATIVE_PATH name "${SOURCE_DIR}" "${source}")
  foreach(line IN LISTS lines)
    if(line MATCHES "DESIGN|§")
      string(APPEND problems "${name}: ${line}\n")
    endif()
  endforeach()
endforeach()
if(problems)
  message(FATAL_ERROR "these lines cite a document or a section that is not in the repository:\n${problems}")
endif()
