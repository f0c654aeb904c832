"""CUDA C++ sources of tierkv kernels, shipped as package data and compiled at first use."""
