# ratepool: build the dynamic module against the installed nginx (Debian's
# nginx-dev ships its configure tree in /usr/share/nginx/src) and test it.

NGINX_SRC   ?= /usr/share/nginx/src
NGINX       ?= /usr/sbin/nginx
BUILD       ?= build$(if $(filter 1,$(SANITIZE)),-asan)
CC          ?= cc
CFLAGS_BASE  = -g -O2 -fPIC -fstack-protector-strong -Wformat \
               -Werror=format-security -D_FORTIFY_SOURCE=2
UNIT_CFLAGS  = -g -O1 -Wall -Wextra -Werror -std=c99 -Isrc

ifeq ($(SANITIZE),1)
CFLAGS_BASE += -fsanitize=address,undefined -fno-omit-frame-pointer
UNIT_CFLAGS += -fsanitize=address,undefined -fno-omit-frame-pointer
LD_SANITIZE  = -fsanitize=address,undefined
# nginx itself is not instrumented: its workers load the runtime first;
# nginx's pools and exit paths are not leaks worth reporting
TEST_ENV     = RATEPOOL_PRELOAD="$$($(CC) -print-file-name=libasan.so) \
               $$($(CC) -print-file-name=libubsan.so)" \
               ASAN_OPTIONS=detect_leaks=0:abort_on_error=0 \
               UBSAN_OPTIONS=print_stacktrace=1
endif

MODULE       = $(BUILD)/ngx_http_ratepool_module.so
PURE_SRCS   := $(patsubst %,src/%.c,$(shell . ./sources; echo $$RATEPOOL_PURE))
MODULE_SRCS  = $(wildcard src/*.c src/*.h) config sources

.PHONY: all deps module unit fuzz test demo bench capacity deb clean

# the Debian 12 packages ratepool builds and tests with
DEB_PACKAGES = build-essential nginx nginx-dev libssl-dev libhiredis-dev \
               redis-server perl wrk \
               ca-certificates clang libclang-rt-14-dev debhelper prometheus \
               chromium
SUDO        := $(shell [ "$$(id -u)" = 0 ] || echo sudo)

# the clients t/90 runs unmodified, from the npm registry with the
# machine's Node.js and npm; without them t/90 is skipped
NPM_CLIENTS  = @anthropic-ai/sdk@1.17.0 @anthropic-ai/claude-code@2.1.337

all: module unit

deps:
	$(SUDO) apt-get update -qq
	$(SUDO) env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq \
	    --no-install-recommends $(DEB_PACKAGES) > /dev/null
	@mkdir -p build/npm
	command -v npm > /dev/null && npm install --prefix build/npm \
	    --no-audit --no-fund --loglevel=error $(NPM_CLIENTS) \
	    || echo "deps: the npm clients are not installed, t/90 will skip"

module: $(MODULE)

$(BUILD)/nginx/objs/Makefile: config sources src/ratepool_status.html
	@echo "configuring against $(NGINX_SRC) (log: $(BUILD)/nginx/configure.log)"
	@rm -rf $(BUILD)/nginx
	@mkdir -p $(BUILD)
	@cp -r $(NGINX_SRC) $(BUILD)/nginx
	@cd $(BUILD)/nginx && bash -c 'source ./conf_flags && ./configure \
	    "$${NGX_CONF_FLAGS[@]}" --with-cc-opt="$(CFLAGS_BASE)" \
	    --with-ld-opt="$(LD_SANITIZE)" \
	    --add-dynamic-module=$(CURDIR)' > configure.log 2>&1 \
	    || { tail -20 configure.log; exit 1; }

$(MODULE): $(BUILD)/nginx/objs/Makefile $(MODULE_SRCS)
	@echo "building $@ (log: $(BUILD)/make.log)"
	@$(MAKE) -C $(BUILD)/nginx -f objs/Makefile modules \
	    > $(BUILD)/make.log 2>&1 \
	    || { grep -E -A6 'error:|Error [0-9]' $(BUILD)/make.log | head -60; \
	         exit 1; }
	@cp $(BUILD)/nginx/objs/ngx_http_ratepool_module.so $@.tmp
	@mv -f $@.tmp $@   # a running nginx keeps its mapping of the old file

$(BUILD)/unit_tests: t/unit/unit_tests.c $(PURE_SRCS) src/*.h
	mkdir -p $(BUILD)
	$(CC) $(UNIT_CFLAGS) -o $@ t/unit/unit_tests.c $(PURE_SRCS) -lcrypto \
	    $(LD_SANITIZE)

unit: $(BUILD)/unit_tests

# libFuzzer targets of the pure parsers; t/02-fuzz.t runs them briefly
FUZZ_CFLAGS  = -g -O1 -Isrc -fsanitize=fuzzer,address,undefined
FUZZERS      = $(BUILD)/fuzz/fuzz_usage $(BUILD)/fuzz/fuzz_parse \
               $(BUILD)/fuzz/fuzz_request $(BUILD)/fuzz/fuzz_resp \
               $(BUILD)/fuzz/fuzz_eventstream

$(BUILD)/fuzz/%: t/fuzz/%.c $(PURE_SRCS) src/*.h
	@mkdir -p $(BUILD)/fuzz
	clang $(FUZZ_CFLAGS) -o $@ $< $(PURE_SRCS) -lcrypto

fuzz: $(FUZZERS)

test: module unit fuzz
	$(TEST_ENV) RATEPOOL_MODULE=$(CURDIR)/$(MODULE) \
	    RATEPOOL_UNIT=$(CURDIR)/$(BUILD)/unit_tests \
	    RATEPOOL_FUZZ_DIR=$(CURDIR)/$(BUILD)/fuzz prove -I t/lib t/

demo: module
	./demo/run

bench: module
	./bench/run

capacity: module
	./bench/capacity
	./bench/agents

# a Debian package, as Debian's own nginx modules are built: debhelper,
# nginx-dev's tree and dh_nginx (the module enabled on install, the
# nginx-abi dependency); its version is VERSION's
VERSION     := $(shell cat VERSION)
DEB          = build/deb/libnginx-mod-http-ratepool_$(VERSION)_$(shell dpkg --print-architecture 2>/dev/null).deb

deb: $(DEB)

$(DEB): $(MODULE_SRCS) VERSION $(wildcard debian/* debian/*/*)
	rm -rf build/deb && mkdir -p build/deb/src
	tar --exclude=./build --exclude='./build-*' --exclude=./.git -cf - . \
	    | tar -xf - -C build/deb/src
	printf '%s (%s) unstable; urgency=medium\n\n  * %s\n\n -- %s  %s\n' \
	    libnginx-mod-http-ratepool $(VERSION) \
	    'Built from the ratepool source tree.' \
	    'ratepool authors <ratepool@users.noreply.github.com>' "$$(date -R)" \
	    > build/deb/src/debian/changelog
	cd build/deb/src && dpkg-buildpackage -b -us -uc > ../build.log 2>&1 \
	    || { tail -30 ../build.log; exit 1; }
	@ls build/deb/*.deb

clean:
	rm -rf $(BUILD)
