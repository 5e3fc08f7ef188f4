# Writes OUTPUT, a C file defining one NUL-terminated char array per input file (named by NAMES), so the
# kernel sources travel inside the library and NVRTC compiles exactly what was built.
# Usage: cmake -DOUTPUT=f.c -DINPUTS=a|b -DNAMES=n1|n2 -P embed_sources.cmake
# INPUTS and NAMES are "|"-separated (a ";" would split the command line that passes them).
string(REPLACE "|" ";" INPUTS "${INPUTS}")
string(REPLACE "|" ";" NAMES "${NAMES}")
set(content "/* Generated from the kernel sources by cmake/embed_sources.cmake; do not edit. */\n")
list(LENGTH INPUTS count)
math(EXPR last "${count} - 1")
foreach(i RANGE ${last})
  list(GET INPUTS ${i} input)
  list(GET NAMES ${i} name)
  file(READ ${input} hex HEX)
  string(REGEX REPLACE "([0-9a-f][0-9a-f])" "0x\\1," hex "${hex}")
  string(REGEX REPLACE "((0x[0-9a-f][0-9a-f],){24})" "\\1\n" hex "${hex}")
  string(APPEND content "const char ${name}[] = {\n${hex}0x00};\n")
endforeach()
file(WRITE ${OUTPUT}.tmp "${content}")
file(COPY_FILE ${OUTPUT}.tmp ${OUTPUT} ONLY_IF_DIFFERENT)
file(REMOVE ${OUTPUT}.tmp)
