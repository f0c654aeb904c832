"""Sources of tierkv kernels (CUDA C++ for the GPU, C for the CPU hasher), shipped as package data and compiled at first use."""
