#!/usr/bin/perl

# Installed like Debian's own nginx modules: `make deb` builds
# libnginx-mod-http-ratepool with debhelper and nginx-dev's dh_nginx; apt
# installs it, which enables it through /etc/nginx/modules-enabled, with
# a dependency on the nginx ABI it was built for; the system's nginx then
# passes `nginx -t` and serves a pool with the module as the package
# loads it; removing the package disables it and nginx still starts.
# Changes the machine's nginx: runs as root only (CI's fresh machine),
# and only when the package is not installed already.

use strict;
use warnings;

use lib 't/lib';

use FindBin;
use Test::More;

use Ratepool::Test;

my $repo = "$FindBin::Bin/..";
my $package = 'libnginx-mod-http-ratepool';

plan skip_all => 'installs a package: root only' unless $> == 0;
plan skip_all => 'no dpkg-buildpackage or dh_nginx (make deps)'
    unless -x '/usr/bin/dpkg-buildpackage' && -x '/usr/bin/dh_nginx';
plan skip_all => "$package is installed already: left as it is"
    if `dpkg-query -W -f='\${Status}' $package 2>/dev/null`
       =~ /install ok installed/;

chomp(my $version = `cat $repo/VERSION`);
chomp(my $arch = `dpkg --print-architecture`);
my $deb = "$repo/build/deb/${package}_${version}_$arch.deb";

sub run_quiet {
    my ($cmd) = @_;
    my $out = `$cmd 2>&1`;
    return ($? >> 8, $out);
}

my ($rc, $out) = run_quiet("make -C $repo deb");
is($rc, 0, 'make deb builds the package') or diag $out;
ok(-f $deb, "as $package\_$version\_$arch.deb, its version VERSION's");

my $abi = `dpkg-query -W -f='\${Provides}' nginx` =~ /(nginx-abi-[\w.-]+)/
          ? $1 : 'nginx-abi';
like(`dpkg-deb -f $deb Depends`, qr/\Q$abi\E/,
     "it depends on the ABI of the nginx it was built for ($abi)");

# --- installed ---------------------------------------------------------------

END {
    # whatever happened, the machine's nginx is left as it was
    system("DEBIAN_FRONTEND=noninteractive apt-get remove -y -qq $package "
           . '> /dev/null 2>&1')
        if $> == 0 && `dpkg-query -W -f='\${Status}' $package 2>/dev/null`
                      =~ /install ok installed/;
}

($rc, $out) = run_quiet("DEBIAN_FRONTEND=noninteractive apt-get install "
                        . "-y -qq $deb");
is($rc, 0, 'apt installs it') or diag $out;

my $enabled = '/etc/nginx/modules-enabled/50-mod-http-ratepool.conf';
ok(-l $enabled, 'which enables the module through modules-enabled');
like(`cat $enabled 2>/dev/null`,
     qr{^load_module modules/ngx_http_ratepool_module\.so;}m,
     'loading the installed module');
ok(-f '/usr/lib/nginx/modules/ngx_http_ratepool_module.so',
   'from /usr/lib/nginx/modules');
ok(-f '/etc/nginx/conf.d/ratepool.conf.example'
   && -f "/usr/share/doc/$package/examples/team-gateway.conf",
   'with a commented example in conf.d (never loaded) and the examples');
ok(!grep({ !/^\s*(#|$)/ } split /\n/,
         `cat /etc/nginx/conf.d/ratepool.conf.example`),
   'the example in conf.d is comments only');

($rc, $out) = run_quiet('/usr/sbin/nginx -t');
is($rc, 0, 'the system\'s nginx configuration passes nginx -t with it')
    or diag $out;

# the module as the package loads it serves a pool

my $t = Ratepool::Test->new;
$t->{module} = undef;       # not the build's: the package's

# the snippet names modules/... under nginx's prefix, as Debian's
# /usr/share/nginx/modules does: the test's prefix gets the same link
symlink '/usr/lib/nginx/modules', $t->testdir . '/modules'
    or die "symlink: $!\n";

my $KEY = 'sk-ant-mock-d1-' . Ratepool::Test::random_hex(8);
my $TOKEN = 'gw-deb-' . Ratepool::Test::random_hex(8);
$t->start_mock(port => 1, config => {
    keys => { $KEY => { org => 'org-d', name => 'd1' } } });

$t->write_config(<<"EOF");
include /etc/nginx/modules-enabled/*.conf;
%%TEST_GLOBALS%%

events {
}

http {
    %%TEST_GLOBALS_HTTP%%

    ratepool_zone llm:1m;

    upstream claude {
        ratepool zone=llm;
        ratepool_key d1 org=org-d server=127.0.0.1:%%PORT_1%% key=$KEY;
    }

    ratepool_workspace team;
    ratepool_client team ${\ $t->token_hash($TOKEN)};

    server {
        listen 127.0.0.1:%%PORT_0%%;

        location /v1/ {
            ratepool_pass http://claude;
        }

        location = /ratepool/status {
            ratepool_status;
        }
    }
}
EOF

$t->run;
is($t->messages(token => $TOKEN)->{status}, 200,
   'the system\'s nginx serves a pool with the packaged module');
is($t->status->{version}, $version, "and its status says version $version");
$t->stop;

# --- removed -----------------------------------------------------------------

($rc, $out) = run_quiet("DEBIAN_FRONTEND=noninteractive apt-get remove "
                        . "-y -qq $package");
is($rc, 0, 'apt removes it') or diag $out;
ok(!-e $enabled, 'which disables the module');
($rc, $out) = run_quiet('/usr/sbin/nginx -t');
is($rc, 0, 'and the system\'s nginx still passes nginx -t') or diag $out;

done_testing;
