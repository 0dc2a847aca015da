# debci backend "nestbed": what test-package and create-testbed share (sourced by both).
#
# debci (bin/debci-test, bin/debci-localtest) exports debci_suite, debci_arch,
# debci_test_package, debci_test_outputdir and debci_autopkgtest_args; debci.conf may export
# (exported: debci reads it into its own shell, and this runs in a program of its own):
#   debci_nestbed_testbed   the testbed, as nestbed's words after `--` (default: nestbed's
#                           QEMU image for the suite, built once into nestbed's image cache)
#   debci_nestbed_args      more nestbed options for every test run (e.g. "-j 2")
#   NESTBED_CACHE_DIR       nestbed's image cache, shared by every worker on the machine
#                           (builds are locked, saved ready states are renamed into place)

# debci's suite names are Debian's; nestbed's images are named by release
case "${debci_suite:-unstable}" in
  unstable) nestbed_release=sid ;;
  testing) nestbed_release=trixie ;;
  stable) nestbed_release=bookworm ;;
  *) nestbed_release="$debci_suite" ;;
esac
nestbed_arch="${debci_arch:-$(dpkg --print-architecture)}"

# the image of the suite: built when missing (locked: one worker builds, the others wait),
# else found in the cache at once; its directory on stdout
nestbed_image() {
  nestbed image build --release "$nestbed_release" --arch "$nestbed_arch" "$@"
}
