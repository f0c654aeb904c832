"""Data movement ops: copies between tier slots and engine KV layouts; torch references and CUDA kernels."""
