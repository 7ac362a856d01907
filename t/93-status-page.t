#!/usr/bin/perl

# The status page in a browser: headless Chromium loads ?format=html from a
# gateway after known traffic (a dead key, a cooling org, a workspace near
# its daily budget, a client named in the config), runs its script, and the
# numbers it draws are the JSON's. RATEPOOL_SCREENSHOT=file.png saves what
# it looks like.

use strict;
use warnings;

use lib 't/lib';

use Digest::SHA qw(sha256_hex);
use File::Spec;
use JSON::PP;
use List::Util qw(first sum0);
use POSIX qw(WNOHANG);
use Test::More;
use Time::HiRes qw(sleep time);

use Ratepool::Test;

my ($CHROMIUM) = grep { defined && -x }
    $ENV{RATEPOOL_CHROMIUM}, '/usr/bin/chromium', '/usr/bin/chromium-browser';
plan skip_all => 'chromium is not installed: apt-get install chromium'
    unless $CHROMIUM;

my $PAGE = 'src/ratepool_status.html';

my $t = Ratepool::Test->new;

*random_hex = \&Ratepool::Test::random_hex;
*by_name = \&Ratepool::Test::by_name;

my %SECRET = map { $_ => 'sk-ant-mock-' . random_hex(16) } qw(a1 a2 b1);
my %TOKEN = map { $_ => "gw-page-$_-" . random_hex(16) } qw(backend research);

my $mock = $t->start_mock(port => 1, config => {
    keys => { map { $SECRET{$_} => { org => 'org-' . substr($_, 0, 1),
                                     name => $_ } } keys %SECRET },
    orgs => { 'org-a' => { rpm => 600, itpm => 40000, otpm => 9000 },
              'org-b' => { rpm => 500, itpm => 50000, otpm => 7000 } },
});

$t->write_config(<<"EOF");
%%TEST_GLOBALS%%

events {
}

http {
    %%TEST_GLOBALS_HTTP%%

    ratepool_zone llm:1m;

    upstream claude {
        ratepool zone=llm;
        ratepool_org org-a rpm=1000;
        ratepool_org org-b;
        ratepool_key a1 org=org-a server=127.0.0.1:%%PORT_1%%
                     key=$SECRET{a1};
        ratepool_key a2 org=org-a server=127.0.0.1:%%PORT_1%%
                     key=$SECRET{a2};
        ratepool_key b1 org=org-b server=127.0.0.1:%%PORT_1%%
                     key=$SECRET{b1};
        keepalive 8;
    }

    ratepool_workspace backend rpm=100 daily_tokens=1000000;
    ratepool_workspace research daily_tokens=1000;
    ratepool_client backend sha256:@{[ sha256_hex($TOKEN{backend}) ]}
                    name=alice;
    ratepool_client research sha256:@{[ sha256_hex($TOKEN{research}) ]};

    log_format accept '\$request_uri "\$http_accept"';

    server {
        listen 127.0.0.1:%%PORT_0%%;

        location /v1/ {
            ratepool_pass http://claude;
        }

        location = /ratepool/status {
            access_log %%TESTDIR%%/status.log accept;
            ratepool_status;
        }
    }
}
EOF

$t->run;

sub message {
    my ($ws, @headers) = @_;
    return $t->messages(token => $TOKEN{$ws}, headers => \@headers);
}

sub key_state {
    my ($name) = @_;
    my $keys = by_name($t->status->{pools}[0]{keys});
    return ($keys->{$name} || {})->{state} // '';
}

# traffic: a2 is refused (401) and dies, b1 gets a long 429 and its org
# cools, research spends 90% of its daily budget

$mock->script($SECRET{a2}, [ { status => 401 } ], sticky => 1);
for (1 .. 30) {
    last if key_state('a2') eq 'dead';
    message('backend');
}
is(key_state('a2'), 'dead', 'a2 is dead after the provider\'s 401');

$mock->script($SECRET{b1}, [ { status => 429, retry_after => '120' } ]);
for (1 .. 30) {
    last if key_state('b1') eq 'cooling';
    message('backend');
}
is(key_state('b1'), 'cooling', 'b1 cools after its 429');

for (1 .. 2) {
    my $r = message('research', 'x-mock-usage' => encode_json(
        { input_tokens => 400, output_tokens => 50 }));
    is($r->{status}, 200, "research's request $_ is answered");
}

my $s = $t->status;
my $pool = $s->{pools}[0] || {};
my $ws = by_name($s->{workspaces});

is($ws->{research}{tokens_today}, 900,
    'research used 900 of its 1000 tokens today');
cmp_ok($s->{totals}{requests}, '>', 2, 'requests were counted');

# the page: served for ?format=html and for a browser, as it is in src/

my $r = $t->http(port => $t->port(0), path => '/ratepool/status?format=html');
my $html = $r->{body} // '';

is($r->{status}, 200, '?format=html answers');
like($r->{headers}{'content-type'}, qr{^text/html}, 'with HTML');
ok($html eq Ratepool::Test::_slurp($PAGE), "the page is $PAGE verbatim");
unlike($html, qr/\b(?:src|href|action)\s*=\s*["']?\s*(?:https?:)?\/\//i,
    'it loads nothing from elsewhere');
unlike($html, qr/(?:url\(|\@import)\s*["']?\s*(?:https?:)?\/\//i,
    'not even from its style sheet');

$r = $t->http(port => $t->port(0), path => '/ratepool/status',
              headers => { Accept => 'text/html,application/xhtml+xml,'
                                     . 'application/xml;q=0.9,*/*;q=0.8' });
is($r->{status}, 200, 'a browser\'s GET answers');
like($r->{headers}{'content-type'}, qr{^text/html}, 'with the page');

$r = $t->http(port => $t->port(0), path => '/ratepool/status?format=json',
              headers => { Accept => 'application/json' });
like($r->{headers}{'content-type'}, qr{^application/json},
    'the page\'s own request gets the JSON');

# Chromium runs it: what it drew, by data-k, and its console

my $dir = $t->testdir;
my $url = 'http://127.0.0.1:' . $t->port(0) . '/ratepool/status?format=html';
my $rc = chromium('--dump-dom', $url);
my $dom = $t->read_file('chromium.out');
my $console = join '', grep { /:CONSOLE/ } split /^/,
                                              $t->read_file('chromium.err');

is($rc, 0, 'chromium loads the page') or diag $t->read_file('chromium.err');
unlike($console, qr/Uncaught|Refused/,
    'with no script error and nothing refused by its CSP')
    or diag $console;

my %got;
my @dups;
while ($dom =~ /<[a-z][^>]*?\sdata-k="([^"]*)"[^>]*>/g) {
    my ($tag, $k) = ($&, unescape($1));
    my ($v) = $tag =~ /\sdata-v="([^"]*)"/;
    push @dups, $k if exists $got{$k};
    $got{$k} = defined $v ? unescape($v) : undef;
}

ok(!exists $got{'page-error'}, 'the page shows no error')
    or diag $dom =~ /data-k="page-error"[^>]*>([^<]*)/;
cmp_ok($got{polls} // 0, '>=', 1, 'it read the JSON');
ok(!@dups, 'every data-k names one thing') or diag "twice: @dups";
like($t->read_file('status.log'),
    qr{^/ratepool/status\?format=json "application/json"$}m,
    'from this location, asking for JSON');

is($got{'totals/requests'}, $s->{totals}{requests},
    'it shows the requests of the JSON');

for my $key (@{ $pool->{keys} || [] }) {
    my $k = "pool/claude/key/$key->{name}";
    is($got{"$k/state"}, $key->{state}, "and $key->{name}'s state");
    is($got{"$k/sent"}, $key->{sent}, "and what $key->{name} sent");
}
is(scalar @{ $pool->{keys} || [] }, 3, 'of all three keys');

for my $org (@{ $pool->{orgs} || [] }) {
    is($got{"pool/claude/org/$org->{name}/rpm_limit"}, $org->{rpm_limit},
        "and $org->{name}'s rpm limit");
}
is($got{'pool/claude/org/org-a/rpm_limit'}, 600, 'learned from the provider');

for my $name (qw(backend research)) {
    for my $field (qw(admitted tokens_today)) {
        is($got{"workspace/$name/$field"}, $ws->{$name}{$field},
            "and $name\'s $field");
    }
}

my $alice = by_name($s->{clients})->{alice} || {};
cmp_ok($alice->{requests} // 0, '>', 0, 'alice, a named client, asked');
is($got{'client/alice/requests'}, $alice->{requests},
    'and the page shows her requests');
is($got{'client/alice/workspace'}, 'backend', 'in her workspace');

my $a2 = by_name($pool->{keys})->{a2} || {};
cmp_ok($a2->{responses}{401} // 0, '>', 0, 'a2 was answered 401');
is($got{'pool/claude/key/a2/responses/401'}, $a2->{responses}{401},
    'and the page shows its 401s');
is($got{'pool/claude/key/a2/dead_since'}, $a2->{dead_since},
    'and since when it is dead');

cmp_ok($pool->{answers}{'2xx'} // 0, '>', 0,
    'the pool\'s clients were answered 2xx');
is($got{'pool/claude/answers/2xx'}, $pool->{answers}{'2xx'},
    'and the page shows how many');

SKIP: {
    skip 'the JSON has no history', 2 unless $s->{history};
    is($got{'history/requests/sum'}, sum0(@{ $s->{history}{requests} }),
        'and the requests of the last ten minutes');
    is($got{'history/upstream_429/sum'},
        sum0(@{ $s->{history}{upstream_429} || [] }),
        'and the provider\'s 429s');
}

# what is wrong, most severe first

my ($list) = $dom =~ m{<ul[^>]*data-k="problems"[^>]*>(.*?)</ul>}s;
my @problems = map { s/<[^>]*>//gr } ($list // '') =~ m{<li[^>]*>(.*?)</li>}sg;
my $dead = first { $problems[$_] =~ /key a2 \(org-a\) dead\b.*\b401\b/ }
           0 .. $#problems;
my $cool = first { $problems[$_] =~ /\borg-b\b.*\bcooling\b/ }
           0 .. $#problems;

ok(defined $dead, 'the problems name the dead key and why')
    or diag explain \@problems;
like($problems[$dead // 0] // '',
    qr/dead since \d\d:\d\d:\d\d \(\d+ (?:s|min)\)/,
    'and since when, by the gateway\'s clock');
ok(defined $cool, 'and the cooling org');
ok(scalar(grep { /workspace research at 90% of its daily token budget/ }
           @problems), 'and the workspace near its budget');
ok(defined $dead && defined $cool && $dead < $cool, 'the dead key first');
ok(!exists $got{'all-good'}, 'it does not say all is well');

# a picture for the README

if (my $shot = $ENV{RATEPOOL_SCREENSHOT}) {
    $shot = File::Spec->rel2abs($shot);
    unlink $shot;
    chromium('--screenshot=' . $shot, '--window-size=1280,1100',
             '--hide-scrollbars', $url);
    ok(-s $shot, "the page is pictured in $shot");
}

$t->stop;
$t->check_log;

done_testing;

# Runs headless Chromium on the page (60 s at most); its stdout goes to
# chromium.out, its stderr (with the page's console) to chromium.err.
sub chromium {
    my (@args) = @_;

    my $pid = fork // die "fork: $!\n";
    if (!$pid) {
        setpgrp(0, 0);
        open STDOUT, '>', "$dir/chromium.out" or POSIX::_exit(126);
        open STDERR, '>', "$dir/chromium.err" or POSIX::_exit(126);
        exec $CHROMIUM, '--headless=new', '--no-sandbox', '--disable-gpu',
            '--no-first-run', "--user-data-dir=$dir/chromium",
            '--enable-logging=stderr', '--v=0', '--virtual-time-budget=6000',
            @args
            or POSIX::_exit(127);
    }

    my $deadline = time + 60;
    while (time < $deadline) {
        return $? if waitpid($pid, WNOHANG) == $pid;
        sleep 0.1;
    }
    kill KILL => -$pid;
    waitpid $pid, 0;
    return -1;
}

sub unescape {
    my ($s) = @_;
    my %entity = (amp => '&', quot => '"', lt => '<', gt => '>',
                  nbsp => "\xa0");
    $s =~ s/&(\w+);/$entity{$1} \/\/ "&$1;"/ge;
    $s =~ s/&#(\d+);/chr $1/ge;
    return $s;
}
