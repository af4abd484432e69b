from setuptools import setup

setup(
    cffi_modules=["ffibuild/build_native.py:ffi"],
    ext_package="callbackworker",
)
