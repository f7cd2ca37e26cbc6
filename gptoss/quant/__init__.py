"""The number formats weights are held in: MXFP4 (the experts, as GPT-OSS ships them) and int8 blocks
(the optional format of the dense layers). Pure tensor arithmetic, below everything that uses it."""
