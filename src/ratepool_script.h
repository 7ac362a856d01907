
/*
 * Copyright (C) ratepool authors
 */


#ifndef _RATEPOOL_SCRIPT_H_INCLUDED_
#define _RATEPOOL_SCRIPT_H_INCLUDED_


/*
 * The reply to a take, undo or adjust: status, wait, why, and what the
 * gateway copies into its zone.
 */

#define RATEPOOL_SCRIPT_OK            0
#define RATEPOOL_SCRIPT_WAIT_MS       1
#define RATEPOOL_SCRIPT_MASK          2
#define RATEPOOL_SCRIPT_COOLDOWN_MS   3
#define RATEPOOL_SCRIPT_LEARNED       4     /* 3: requests, in, out */
#define RATEPOOL_SCRIPT_DAY_USED      7
#define RATEPOOL_SCRIPT_MONTH_USED    8
#define RATEPOOL_SCRIPT_WS_LEFT       9     /* 3: what is left in each */
#define RATEPOOL_SCRIPT_ORG_LEFT      12    /* 3 */
#define RATEPOOL_SCRIPT_LEASED        15    /* a take's lease was granted */
#define RATEPOOL_SCRIPT_DAY_COST      16    /* nano-dollars */
#define RATEPOOL_SCRIPT_MONTH_COST    17
#define RATEPOOL_SCRIPT_REPLY_LEN     18

/* why a take was refused */
#define RATEPOOL_DENY_WORKSPACE       0x07  /* its requests or tokens */
#define RATEPOOL_DENY_BUDGET          0x08
#define RATEPOOL_DENY_COOLDOWN        0x10
#define RATEPOOL_DENY_ORG             0xe0


extern const char  ratepool_script[];


#endif /* _RATEPOOL_SCRIPT_H_INCLUDED_ */
