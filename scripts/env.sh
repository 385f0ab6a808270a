# Shared settings for scripts/ (sourced).
# Debian packages the build needs, "probe:package" (probe = a command, or a file glob).
export MIG_AUTOSCALER_APT_NEEDS="cmake:cmake c++:g++ /usr/lib/llvm-*/lib/libclang.so*:libclang-dev kubectl:kubernetes-client"
