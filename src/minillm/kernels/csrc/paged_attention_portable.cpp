// The paged attention op built for one x86 level (kernels/flags.py gives its -march); the loader picks
// the one this CPU runs (minillm.kernels.paged_attention_level).
#include "paged_attention_kernel.h"
