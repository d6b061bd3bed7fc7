// The board's energy counter for the standalone CUDA tools (bench_kernels, read_floor).
#pragma once

#include <dlfcn.h>

// NVML, loaded at run time so the tools need no NVML to build: under the power cap, energy per
// call is what sets the back-to-back speed. Returns false if NVML or the counter is unavailable.
// Device index 0 (the tools use the first GPU).
static bool board_energy_mj(unsigned long long* mj) {
  using InitFn = int (*)();
  using HandleFn = int (*)(unsigned, void**);
  using EnergyFn = int (*)(void*, unsigned long long*);
  static EnergyFn energy = nullptr;
  static void* dev = nullptr;
  static const bool ok = [] {
    void* lib = dlopen("libnvidia-ml.so.1", RTLD_NOW);
    if (lib == nullptr) return false;
    auto init = reinterpret_cast<InitFn>(dlsym(lib, "nvmlInit_v2"));
    auto handle = reinterpret_cast<HandleFn>(dlsym(lib, "nvmlDeviceGetHandleByIndex_v2"));
    energy = reinterpret_cast<EnergyFn>(dlsym(lib, "nvmlDeviceGetTotalEnergyConsumption"));
    return init != nullptr && handle != nullptr && energy != nullptr && init() == 0 &&
           handle(0, &dev) == 0;
  }();
  return ok && energy(dev, mj) == 0;
}
