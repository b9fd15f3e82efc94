"""A stand-in ``flash_attn`` package whose functions are tokenforge's attention ops, so flash_attn's
own tests/test_flash_attn.py runs against tokenforge (bench/peers/run_peer_tests.sh puts this
folder first on PYTHONPATH and adds the checkout's pure-Python bert_padding.py beside this file).
tokenforge's attention API takes flash_attn's arguments in flash_attn's order."""
from tokenforge.ops import attention as flash_attn_func
from tokenforge.ops import attention_kvpacked as flash_attn_kvpacked_func
from tokenforge.ops import attention_qkvpacked as flash_attn_qkvpacked_func
from tokenforge.ops import attention_varlen as flash_attn_varlen_func
from tokenforge.ops import attention_varlen_kvpacked as flash_attn_varlen_kvpacked_func
from tokenforge.ops import attention_varlen_qkvpacked as flash_attn_varlen_qkvpacked_func
from tokenforge.ops import attention_with_kvcache as flash_attn_with_kvcache
