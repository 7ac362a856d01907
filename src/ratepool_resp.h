
/*
 * Copyright (C) ratepool authors
 */


#ifndef _RATEPOOL_RESP_H_INCLUDED_
#define _RATEPOOL_RESP_H_INCLUDED_


#include <stddef.h>
#include <stdint.h>


/*
 * Redis commands in RESP, the protocol's request form: an array of bulk
 * strings.  Replies are read with hiredis's reader; requests are written
 * here, into the caller's buffer, so that no allocation is made per
 * command.
 */

typedef struct {
    const unsigned char  *data;
    size_t                len;
} ratepool_resp_arg_t;


size_t ratepool_resp_header_size(size_t nargs);
unsigned char *ratepool_resp_header(unsigned char *p, size_t nargs);
size_t ratepool_resp_arg_size(size_t len);
unsigned char *ratepool_resp_arg(unsigned char *p, const unsigned char *data,
    size_t len);
size_t ratepool_resp_format(unsigned char *buf, size_t size,
    const ratepool_resp_arg_t *args, size_t nargs);
unsigned char *ratepool_resp_uint(unsigned char *p, uint64_t n);


#endif /* _RATEPOOL_RESP_H_INCLUDED_ */
