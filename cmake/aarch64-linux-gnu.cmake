# Cross-compiling the torch-free kernels for aarch64 Linux with Debian's
# g++-aarch64-linux-gnu (used by `make check-arm`, which runs the result under
# qemu-aarch64).  Only -DLLMEQ_KERNELS_ONLY=ON builds are meant to use it:
# the extension needs an aarch64 torch, which this host does not have.
set(CMAKE_SYSTEM_NAME Linux)
set(CMAKE_SYSTEM_PROCESSOR aarch64)
set(CMAKE_C_COMPILER aarch64-linux-gnu-gcc)
set(CMAKE_CXX_COMPILER aarch64-linux-gnu-g++)
set(CMAKE_FIND_ROOT_PATH /usr/aarch64-linux-gnu)
set(CMAKE_FIND_ROOT_PATH_MODE_PROGRAM NEVER)
set(CMAKE_FIND_ROOT_PATH_MODE_LIBRARY ONLY)
set(CMAKE_FIND_ROOT_PATH_MODE_INCLUDE ONLY)
set(CMAKE_FIND_ROOT_PATH_MODE_PACKAGE ONLY)
# Linked dynamically (FindOpenMP hands over libgomp.so): run the result with
# `qemu-aarch64 -L /usr/aarch64-linux-gnu` (or QEMU_LD_PREFIX), the sysroot the
# cross compiler's Debian packages install.
