#ifndef TN_CPU_BACKEND_H
#define TN_CPU_BACKEND_H

#include "../core/backend.h"

extern const tn_backend tn_cpu_backend;

#endif
