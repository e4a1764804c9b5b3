"""The TSN wire: what the gateway's TSN driver and the simulator's TSN endpoint both speak.

OPC UA PubSub UADP NetworkMessages (OPC 10000-14) over Ethernet in 802.1Q tags, signed and
encrypted Part 14 style, sent by an 802.1Qbv-style gate control list. It lives below both the
drivers and the simulator (like `siteconfig`), because the simulator may import nothing of the
gateway or its drivers (docs/design.md, one-way imports): the two ends share the frame codec,
the security and the schedule, and nothing else.

    uadp      scapy layers (definition, dissection, tests) and the precomputed struct codec (hot path)
    security  key files, HMAC-SHA256 signature, AES-CTR encryption, replay window, late-frame check
    schedule  the gate control list and the user-space transmit scheduler
    link      AF_PACKET sockets: open, send, receive with the VLAN tag from PACKET_AUXDATA
"""
