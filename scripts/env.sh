# Shared settings for scripts/ (sourced).
# Debian packages the build needs, "probe:package" (probe = a command, or a file glob).
export MIG_AUTOSCALER_APT_NEEDS="cmake:cmake c++:g++ /usr/lib/llvm-*/lib/libclang.so*:libclang-dev kubectl:kubernetes-client"
# Only the tests need these (a real browser for the web view, a real Prometheus for metrics and dashboards).
export MIG_AUTOSCALER_APT_TEST_NEEDS="chromium:chromium promtool:prometheus"
