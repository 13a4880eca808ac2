# Runs one demo command line and checks how it ends (the demos' CTest cases, CMakeLists.txt):
#   cmake -DPROGRAM=<path> -DARGS="<args, space separated>" -DCODE=<exit code> -DEXPECT="<a>|<b>|..."
#         [-DSTREAM=stderr|stdout] -P check_demo.cmake
# Passes when the exit code is exactly CODE (an abort -- an uncaught exception -- never matches) and every
# '|'-separated piece of EXPECT occurs literally in STREAM (default stderr). For stderr it also requires exactly
# one line, prefixed with the program's name: a refusal is one line naming the argument, not a backtrace.
# Pieces are literal text, not regular expressions, so the messages' brackets need no escaping.
foreach(var PROGRAM CODE EXPECT)
  if(NOT DEFINED ${var})
    message(FATAL_ERROR "check_demo.cmake: -D${var}=... is required")
  endif()
endforeach()
if(NOT DEFINED STREAM)
  set(STREAM stderr)
endif()
separate_arguments(args UNIX_COMMAND "${ARGS}")
execute_process(COMMAND "${PROGRAM}" ${args} RESULT_VARIABLE code OUTPUT_VARIABLE stdout ERROR_VARIABLE stderr)
get_filename_component(name "${PROGRAM}" NAME)
set(what "${name} ${ARGS}")
if(NOT "${code}" STREQUAL "${CODE}")
  message(FATAL_ERROR "${what}: exit code '${code}', expected ${CODE}\nstderr:\n${stderr}")
endif()
set(text "${${STREAM}}")
string(REPLACE "|" ";" pieces "${EXPECT}")
foreach(piece IN LISTS pieces)
  string(FIND "${text}" "${piece}" at)
  if(at EQUAL -1)
    message(FATAL_ERROR "${what}: '${piece}' not found in ${STREAM}:\n${text}")
  endif()
endforeach()
if(STREAM STREQUAL "stderr")
  string(REGEX MATCHALL "\n" newlines "${stderr}")
  list(LENGTH newlines lines)
  string(FIND "${stderr}" "${name}: " prefix)
  if(NOT lines EQUAL 1 OR NOT prefix EQUAL 0)
    message(FATAL_ERROR "${what}: expected one line starting '${name}: ' on stderr, got ${lines}:\n${stderr}")
  endif()
endif()
