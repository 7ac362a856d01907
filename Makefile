# ratepool: build the dynamic module against the installed nginx (Debian's
# nginx-dev ships its configure tree in /usr/share/nginx/src) and test it.

NGINX_SRC   ?= /usr/share/nginx/src
NGINX       ?= /usr/sbin/nginx
BUILD       ?= build
CC          ?= cc
CFLAGS_BASE  = -g -O2 -fPIC -fstack-protector-strong -Wformat \
               -Werror=format-security -D_FORTIFY_SOURCE=2
UNIT_CFLAGS  = -g -O1 -Wall -Wextra -Werror -std=c99 -Isrc

ifeq ($(SANITIZE),1)
CFLAGS_BASE += -fsanitize=address,undefined -fno-omit-frame-pointer
UNIT_CFLAGS += -fsanitize=address,undefined -fno-omit-frame-pointer
LD_SANITIZE  = -fsanitize=address,undefined
endif

MODULE       = $(BUILD)/ngx_http_ratepool_module.so
PURE_SRCS    = src/ratepool_bucket.c src/ratepool_pick.c src/ratepool_parse.c
MODULE_SRCS  = $(wildcard src/*.c src/*.h) config

.PHONY: all module unit test demo bench clean

all: module unit

module: $(MODULE)

$(BUILD)/nginx/Makefile: config
	rm -rf $(BUILD)/nginx
	mkdir -p $(BUILD)
	cp -r $(NGINX_SRC) $(BUILD)/nginx
	cd $(BUILD)/nginx && bash -c 'source ./conf_flags && ./configure \
	    "$${NGX_CONF_FLAGS[@]}" --with-cc-opt="$(CFLAGS_BASE)" \
	    --with-ld-opt="$(LD_SANITIZE)" \
	    --add-dynamic-module=$(CURDIR)' > configure.log 2>&1 \
	    || { tail -20 configure.log; exit 1; }

$(MODULE): $(BUILD)/nginx/Makefile $(MODULE_SRCS)
	$(MAKE) -C $(BUILD)/nginx -f objs/Makefile modules
	cp $(BUILD)/nginx/objs/ngx_http_ratepool_module.so $@

$(BUILD)/unit_tests: t/unit/unit_tests.c $(PURE_SRCS) src/*.h
	mkdir -p $(BUILD)
	$(CC) $(UNIT_CFLAGS) -o $@ t/unit/unit_tests.c $(PURE_SRCS) $(LD_SANITIZE)

unit: $(BUILD)/unit_tests

test: module unit
	RATEPOOL_MODULE=$(CURDIR)/$(MODULE) RATEPOOL_UNIT=$(CURDIR)/$(BUILD)/unit_tests \
	    prove -I t/lib t/

demo: module
	./demo/run

bench: module
	./bench/run

clean:
	rm -rf $(BUILD)
