"""MOSS-TTS-Nano-100M for Ascend NPU, CUDA and CPU: a Hugging Face remote-code model repository.

The modules at this folder's root import each other relatively, as `trust_remote_code` requires. Scripts and tests
import them as the package `moss_tts_nano` through `local_package.import_local_package()`.
"""
