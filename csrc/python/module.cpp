// kvprec._C: an importable extension module whose only job is to load the library, so that the static
// TORCH_LIBRARY registrars in this .so (ops and classes, csrc/python/*.cpp) run. No pybind11 is needed:
// everything is reached through torch.ops.kvprec.* and torch.classes.kvprec.*.
#include <Python.h>

static struct PyModuleDef kvprec_module = {PyModuleDef_HEAD_INIT, "_C", "kvprec native ops (torch.ops.kvprec)", -1,
                                           nullptr, nullptr, nullptr, nullptr, nullptr};

PyMODINIT_FUNC PyInit__C(void) { return PyModule_Create(&kvprec_module); }
