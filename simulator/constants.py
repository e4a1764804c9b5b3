"""Engineering constants of the plant model, each with its source (see docs/domain.md)."""

from __future__ import annotations

import math

# --- Transfer and ride-through -------------------------------------------------------------
ATS_TOLERANCE_LOW_PU = 0.90  # micro-ATS transfers below this (ITIC steady-state band, >= 90 %)
ATS_TOLERANCE_HIGH_PU = 1.10  # ... and above this (ITIC steady-state upper limit 110 %)
ATS_RETRANSFER_DELAY_S = 300.0  # return to the preferred source after it is stable this long (typical ATS setting)
ATS_ACTUATOR_RECOVERY_S = 2.0  # the actuator refuses a new commanded transfer this soon after the last one
ATS_SELFTEST_PERIOD_S = 600.0  # periodic actuator self-test that measures its response time
ITIC_ZERO_VOLT_RIDE_THROUGH_S = 0.020  # ITIC: 0 % voltage for 20 ms
DES_AUTO_BRIDGE_RESPONSE_MS = 8.0  # DES inverter picks up a unit left with no source (< ITIC 20 ms)
ARC_DETECT_DELAY_MS = (15.0, 80.0)  # arcing joints/contacts chatter the voltage: detection is slow
ARC_RESIDUAL_PU = (0.3, 0.6)  # residual voltage while an arcing fault chatters
LOAD_RESTART_S = 300.0  # a dropped IT load (servers rebooting) is back this long after power returns
BREAKER_RESET_S = 900.0  # a tripped breaker is reset by site staff after this long

# --- Electrical ----------------------------------------------------------------------------
SQRT3 = math.sqrt(3.0)
IT_POWER_FACTOR = 0.97  # IT power supplies with active PFC: 0.95-0.99
SEGMENT_DROP_AT_RATED = 0.01  # PDB busbar: 1 % voltage drop at rated current sets its resistance
FEED_THD_BASE_PCT = 1.2  # voltage THD at no load; IEEE 519 limit 5 % total
FEED_THD_PER_LOADING_PCT = 2.0  # extra THD at full loading from SMPS harmonics

# --- Overload protection (inverse time, thermal model) --------------------------------------
# d(theta)/dt = (L^2 - 1) / tau above rated; trip at theta = 1. tau = 12.6 s trips 110 % in 60 s,
# 150 % in 10 s and 200 % in about 4 s, close to an IEC 60255 "extremely inverse" curve.
OVERLOAD_TAU_S = 12.6
OVERLOAD_COOL_TAU_S = 300.0

# --- Thermal ------------------------------------------------------------------------------
JOINT_R_NOMINAL_UOHM = (60.0, 120.0)  # bolted busway joint, 125 A class, new
JOINT_RTH_K_PER_W = 15.0  # joint-to-ambient thermal resistance
JOINT_REF_RATING_A = 125.0  # the joint figures above are for this busway rating; R and Rth scale with 125 A / rating
JOINT_WEAR_MIN_LOADING = 0.05  # a loosening joint degrades (I^2 R runaway) only above this share of rated current
JOINT_TAU_S = 900.0  # thermal time constant of a busbar joint (15 min)
CONTACT_R_NOMINAL_UOHM = (200.0, 400.0)  # 40 A contactor contact set
CONTACT_RTH_K_PER_W = 20.0
CONTACT_REF_RATING_A = 40.0  # the contact figures above are for this rating; R and Rth scale with 40 A / rating
CONTACT_TAU_S = 600.0
AMBIENT_MEAN_DEGC = 27.0  # ASHRAE recommended inlet 18-27 degC; hot aisle side of the bus is warmer
AMBIENT_DIURNAL_DEGC = 1.5
NETA_DT_PROBABLE_K = 4.0  # NETA thermography: dT 4-15 degC "probable deficiency"
NETA_DT_MAJOR_K = 15.0  # > 15 degC "major deficiency"

# --- Batteries ------------------------------------------------------------------------------
LI_ION_COULOMBIC_EFFICIENCY = 0.995
DES_CONVERTER_EFFICIENCY = 0.96  # each way; round trip ~92 % (85-95 % typical)
DES_CHARGE_C_RATE = 0.3  # gentle recharge
DES_R_INT_NOMINAL_MOHM = (20.0, 35.0)
DES_SOC_STANDBY_TARGET_MARGIN_PCT = 5.0  # recharge to soc_max - margin
DES_INVERTER_OUTPUT_PU = 1.0  # an islanded DES inverter regulates the unit's load bus at nominal voltage
DES_CELL_TAU_S = 1200.0  # thermal time constant of a DES pack
BATTERY_R_REPLACE_RATIO = 1.2  # internal resistance > 120 % of baseline: replacement trigger
BACKUP_BATTERY = {  # (nominal voltage V, internal resistance mOhm)
    "ups": (480.0, 40.0),  # 40 x 12 V VRLA string
    "generator": (25.4, 6.0),  # 24 V lead-acid starting battery
    "none": (0.0, 0.0),
}

# --- Loads ----------------------------------------------------------------------------------
LOAD_AR_TAU_S = 600.0
