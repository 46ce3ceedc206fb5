"""Detection accuracy: COCO AP (pycocotools) and VOC AP, and the detections files they
read. May import ``nasfcos.data``, ``nasfcos.progress`` and ``atomicio``; not the model
(the engine or the caller runs it)."""
