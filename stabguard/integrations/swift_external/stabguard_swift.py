"""ms-swift external plugin: ``swift sft ... --external_plugins <this file>`` guards the SFT trainer.

ms-swift imports this file by path and puts its folder on ``sys.path``; the folder holds nothing else, so
no module here can shadow an installed package. The work is in :mod:`stabguard.integrations.ms_swift`.
"""

from stabguard.integrations.ms_swift import install

install()
