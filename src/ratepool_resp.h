
/*
 * Copyright (C) ratepool authors
 */


#ifndef _RATEPOOL_RESP_H_INCLUDED_
#define _RATEPOOL_RESP_H_INCLUDED_


#include <stddef.h>
#include <stdint.h>


/*
 * Redis commands in RESP, the protocol's request form: an array of bulk
 * strings.  Replies are read with hiredis's reader, once checked here;
 * requests are written here, into the caller's buffer, so that no
 * allocation is made per command.
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


/*
 * Replies are checked as they arrive, before hiredis reads them: a reply
 * that announces more elements or bytes than any reply ratepool asks for
 * can have, or nests deeper, or uses a type hiredis 0.14 cannot read, is
 * refused before anything is allocated for it.  Bytes may be fed split
 * anywhere.
 */

#define RATEPOOL_RESP_ELEMENTS_MAX  64      /* of an array */
#define RATEPOOL_RESP_BULK_MAX      65536   /* bytes of a bulk string */
#define RATEPOOL_RESP_LINE_MAX      1024    /* a status or error line */
#define RATEPOOL_RESP_DEPTH_MAX     4

#define RATEPOOL_RESP_OK            0
#define RATEPOOL_RESP_TOO_LARGE     1
#define RATEPOOL_RESP_BAD           2

typedef struct {
    unsigned     state;
    unsigned     type;              /* of the line being read */
    unsigned     line_len;
    unsigned     digits;
    unsigned     negative:1;
    uint64_t     number;
    uint64_t     bulk_left;         /* payload bytes to skip */
    unsigned     depth;             /* arrays open */
    uint64_t     left[RATEPOOL_RESP_DEPTH_MAX];  /* elements still due */
    int          error;             /* RATEPOOL_RESP_*, sticky */
} ratepool_resp_check_t;


void ratepool_resp_check_init(ratepool_resp_check_t *c);
int ratepool_resp_check(ratepool_resp_check_t *c, const unsigned char *p,
    size_t len);


#endif /* _RATEPOOL_RESP_H_INCLUDED_ */
